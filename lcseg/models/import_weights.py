"""Converts ImageNet ResNet weights from a torchvision checkpoint, once, for a config.

    python -m lcseg.models.import_weights resnet50-0676ba61.pth weights/resnet50.npz
    python main.py --config configs/deeplabv3plus_deepglobe.py --workdir runs/dl \\
        --config.model.pretrained=weights/resnet50.npz

Reads a torchvision-layout ResNet-18/34/50/101 state dict (``.pth``/``.pt``/``.bin``
written by ``torch.save``, ``.safetensors``, or ``.npz``; PyTorch is not needed and
nothing in the file is executed), converts it to the layout of
``lcseg.models.resnet.ResNet`` and writes one ``.npz`` holding the weights, the
architecture and the input normalisation they were trained with (``--mean``/``--std``,
ImageNet's by default: torchvision's weights expect [0, 1] pixels normalised with them).
Training loads the file into the model's encoder with ``lcseg.models.load_pretrained``,
which checks every key and shape; see ``lcseg.models.pretrained`` for the details.
"""

from __future__ import annotations

import argparse
import pickle
import sys

from lcseg.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    convert_resnet,
    read_state_dict,
    save_pretrained,
)
from lcseg.models.summary import count_parameters


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit status.

    Args:
      argv: command-line arguments (without the program name); None: ``sys.argv[1:]``.

    Returns:
      0 on success; an unreadable or non-ResNet input exits with status 1 and a message
      naming the file and the problem.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lcseg.models.import_weights",
        description="Convert a torchvision ResNet checkpoint for config.model.pretrained.")
    parser.add_argument("input", help="torchvision checkpoint (.pth, .safetensors, .npz)")
    parser.add_argument("output", help="converted weights file to write (.npz)")
    parser.add_argument("--mean", type=float, nargs="+", default=list(IMAGENET_MEAN),
                        help="per-band mean of [0, 1] pixels the weights were trained with")
    parser.add_argument("--std", type=float, nargs="+", default=list(IMAGENET_STD),
                        help="per-band standard deviation likewise")
    args = parser.parse_args(argv)
    if len(args.mean) != len(args.std):
        parser.error(f"--mean has {len(args.mean)} values and --std {len(args.std)}")

    try:
        weights = convert_resnet(read_state_dict(args.input), mean=tuple(args.mean),
                                 std=tuple(args.std))
        save_pretrained(args.output, weights, source=args.input)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        parser.exit(1, f"Cannot import {args.input}: {error}\n")
    print(f"{args.input}: {weights.arch}, {count_parameters(weights.params):,} encoder "
          f"parameters -> {args.output}\nnormalisation: mean {weights.mean}, std "
          f"{weights.std}\nuse it with --config.model.pretrained={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
