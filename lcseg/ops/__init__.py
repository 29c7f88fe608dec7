"""Custom operations: convolutions that train at matmul speed on XLA:CPU (``fast_conv``)."""

from lcseg.ops.fast_conv import (
    conv_general_dilated,
    conv_transpose_nonoverlapping,
    fast_apply,
    should_use_fast_conv,
    use_fast_convolutions,
    weight_gradient,
)

__all__ = ["conv_general_dilated", "conv_transpose_nonoverlapping", "fast_apply",
           "should_use_fast_conv", "use_fast_convolutions", "weight_gradient"]
