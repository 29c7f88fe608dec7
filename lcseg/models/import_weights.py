"""Converts torchvision backbone weights, once, for ``config.model.pretrained``.

    python -m lcseg.models.import_weights resnet50-0676ba61.pth weights/resnet50.npz
    python main.py --config configs/deeplabv3plus_deepglobe.py --workdir runs/dl \\
        --config.model.pretrained=weights/resnet50.npz

    # SatlasPretrain (torchgeo's Swin_V2_B_Weights.*_SATLAS): RGB pixels / 255, no mean.
    python -m lcseg.models.import_weights sentinel2_swinb_si_rgb.pth weights/satlas.npz \\
        --normalisation=satlas

Reads a torchvision-layout state dict (``.pth``/``.pt``/``.bin`` written by
``torch.save``, ``.safetensors``, or ``.npz``; PyTorch is not needed and nothing in the
file is executed) of a backbone lcseg knows (ResNet-18/34/50/101, SwinV2-T/S/B, VGG16:
recognised from its keys), converts it to lcseg's layout and writes one ``.npz`` holding
the weights, the architecture and the input normalisation they were trained with
(``--normalisation``: ``imagenet``, torchvision's, by default; ``satlas``: mean 0 and
std 1 on every band, i.e. pixels / 255; or ``--mean``/``--std`` for [0, 1] pixels).
Training loads the file into the model's backbone with ``lcseg.models.load_pretrained``,
which checks every key and shape; see ``lcseg.models.pretrained``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

from absl import app, flags

from lcseg import cli
from lcseg.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedWeights,
    convert_state_dict,
    save_pretrained,
)
from lcseg.models.summary import count_parameters
from lcseg.models.torch_checkpoint import read_state_dict

NORMALISATIONS = ("imagenet", "satlas")
FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program, like every lcseg command.
    flags.DEFINE_enum("normalisation", "imagenet", NORMALISATIONS,
                      "Input statistics the weights were trained with: torchvision's "
                      "ImageNet ones, or SatlasPretrain's (mean 0, std 1: pixels / 255).")
    flags.DEFINE_list("mean", None, "Per-band mean of [0, 1] pixels (overrides "
                      "--normalisation), e.g. --mean=0.4,0.5,0.6.")
    flags.DEFINE_list("std", None, "Per-band standard deviation likewise.")


def convert(source: str, output: str, *, normalisation: str = "imagenet",
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None
            ) -> PretrainedWeights:
    """Converts the checkpoint ``source`` and writes ``output``; returns the weights.

    Args:
      source: a torchvision checkpoint (``.pth``, ``.safetensors``, ``.npz``).
      output: the converted ``.npz`` to write.
      normalisation: ``'imagenet'`` or ``'satlas'`` (see the module docstring).
      mean: per-band mean of [0, 1] pixels; overrides ``normalisation`` (with ``std``).
      std: per-band standard deviation likewise.

    Raises:
      ValueError: an unknown normalisation, ``mean`` without ``std`` or of another length,
        or a file that is not a state dict of a known backbone (the message says which).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation {normalisation!r}; expected one of {NORMALISATIONS}")
    if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
        raise ValueError(f"--mean ({mean}) and --std ({std}) must be given together, with "
                         "one value per band each")
    try:
        state_dict = read_state_dict(source)
    except pickle.UnpicklingError as error:
        raise ValueError(str(error)) from error
    if mean is None:
        if normalisation == "satlas":
            # Satlas normalises pixels / 255 alone, on however many bands the weights read.
            bands = next(v.shape[1] for k, v in state_dict.items()
                         if k.endswith("weight") and v.ndim == 4)
            mean, std = (0.0,) * bands, (1.0,) * bands
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
    weights = convert_state_dict(state_dict, mean=tuple(map(float, mean)),
                                 std=tuple(map(float, std)))
    save_pretrained(output, weights, source=source)
    return weights


def main(argv: Sequence[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError("Usage: python -m lcseg.models.import_weights INPUT OUTPUT.npz "
                             "[--normalisation=imagenet|satlas] [--mean=... --std=...]")
    source, output = argv[1:]
    with cli.exit_on_bad_input("lcseg.models.import_weights"):
        weights = convert(source, output, normalisation=FLAGS.normalisation,
                          mean=FLAGS.mean and [float(v) for v in FLAGS.mean],
                          std=FLAGS.std and [float(v) for v in FLAGS.std])
    print(f"{source}: {weights.arch}, {count_parameters(weights.params):,} encoder "
          f"parameters -> {output}\nnormalisation: mean {weights.mean}, std "
          f"{weights.std}\nuse it with --config.model.pretrained={output}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
