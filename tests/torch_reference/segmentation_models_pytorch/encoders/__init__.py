# The MIT License
#
# Copyright (c) 2019, Pavel Iakubovskii
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in
# all copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
# THE SOFTWARE.
#
# Copied from segmentation_models_pytorch 0.6.0, as shipped in the PyPI wheel segmentation_models_pytorch-0.6.0-py3-none-any.whl (sha256 c46162221b5abe3bc296b222fbea8aa80d0b56e7130f7ddef654f707804534e2), file segmentation_models_pytorch/encoders/__init__.py.
# Verbatim except: only the ResNet encoders are kept: every import but
# `copy` and `.resnet` (json, timm, warnings, functools,
# huggingface_hub, safetensors, the other encoder families, preprocessing), __all__,
# their `encoders.update(...)` lines, is_equivalent_to_timm_universal and every function
# after get_encoder are removed; in get_encoder, the `timm-`/`tu-` branches and the
# `if weights is not None:` block (Hugging Face Hub download) are removed.

import copy

from .resnet import resnet_encoders


encoders = {}
encoders.update(resnet_encoders)


def get_encoder(name, in_channels=3, depth=5, weights=None, output_stride=32, **kwargs):
    if name not in encoders:
        raise KeyError(
            f"Wrong encoder name `{name}`, supported encoders: {list(encoders.keys())}"
        )

    params = copy.deepcopy(encoders[name]["params"])
    params["depth"] = depth
    params["output_stride"] = output_stride

    EncoderClass = encoders[name]["encoder"]
    encoder = EncoderClass(**params)

    encoder.set_in_channels(in_channels, pretrained=weights is not None)
    if output_stride != 32:
        encoder.make_dilated(output_stride)

    return encoder
