"""Custom operations that train faster on XLA:CPU than their lax forms.

``fast_conv``: convolutions whose weight gradients run at matmul speed; ``pooling``:
non-overlapping max pooling whose gradient is one elementwise pass.
"""

from lcseg.ops.fast_conv import (
    conv_general_dilated,
    conv_transpose_nonoverlapping,
    fast_apply,
    should_use_fast_conv,
    use_fast_convolutions,
    weight_gradient,
)
from lcseg.ops.pooling import max_pool_nonoverlapping

__all__ = ["conv_general_dilated", "conv_transpose_nonoverlapping", "fast_apply",
           "max_pool_nonoverlapping", "should_use_fast_conv", "use_fast_convolutions",
           "weight_gradient"]
