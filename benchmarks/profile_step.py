"""Where the time of lcseg's training step goes on this machine, per XLA operation.

    python benchmarks/profile_step.py [--size 256 --batch 4] [--fast_conv on|off]
        [--bf16] [--steps 2] [--top 25]

Builds the step exactly as training does (``lcseg.experiment.Experiment``; the benchmark
configuration of ``benchmarks/cpu_vs_torch.py``: the 31M-parameter U-Net, 7 classes,
class-weighted cross-entropy, Adam), compiles it, then records ``--steps`` steps with
``jax.profiler`` and sums the time of each compiled operation. Every operation is put in
a category read from the optimized HLO: convolution forward / input gradient / weight
gradient (XLA's), the fast path's weight-gradient loop, other matrix products, and the
memory-bound rest (BatchNorm statistics, elementwise fusions, copies and transposes,
max-pool, the optimizer). Operations inside loops (the fast weight gradient's) are
summed over their iterations. Prints the categories, then the top operations with their
shapes. The wall time per step includes the profiler's overhead (about 1.5x here); the
shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpu_vs_torch import build_lcseg_step  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")


def parse_hlo(text: str) -> tuple[dict, dict, dict, str]:
    """Instructions of an optimized HLO module: name -> (shape, opcode, line), callees.

    Returns ``(instructions, computation_of, calls, entry)``: every instruction by name,
    the computation each belongs to, each one's called computations, and the name of the
    entry computation.
    """
    instructions, computation_of, calls = {}, {}, {}
    current = entry = None
    for line in text.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line.startswith(" "):  # Instructions are indented.
            current = match.group(2)
            if match.group(1):
                entry = current
            continue
        match = _INSTRUCTION.match(line)
        if match:
            name, shape, opcode = match.groups()
            instructions[name] = (shape, opcode, line)
            computation_of[name] = current
            calls[name] = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", line)
    return instructions, computation_of, calls, entry


def categorize(name: str, instructions: dict, computation_of: dict, calls: dict) -> str:
    """A coarse category for one compiled operation (see the module docstring)."""
    if name not in instructions:
        return "other (runtime)"
    shape, opcode, line = instructions[name]
    fast_weight_grad = "fast_conv_weight_grad" in line
    body = []
    stack = list(calls.get(name, []))
    seen = set()
    while stack:  # The instructions of the called (fused) computations.
        computation = stack.pop()
        if computation in seen:
            continue
        seen.add(computation)
        for other, owner in computation_of.items():
            if owner == computation:
                body.append(instructions[other])
                stack.extend(calls.get(other, []))
    lines = [line] + [b[2] for b in body]
    opcodes = {opcode} | {b[1] for b in body}
    if fast_weight_grad:
        return ("fast weight-grad: products" if "dot" in opcodes
                else "fast weight-grad: patches, slices")
    if opcode == "while":  # (XLA:CPU reports a loop's operations, not the loop.)
        return "while loop"
    if "convolution" in opcodes:
        conv_line = next(x for x in lines if " convolution(" in x)
        window = re.search(r"window=\{size=([\dx]+)", conv_line)
        size = [int(v) for v in window.group(1).split("x")] if window else [1]
        backward = "transpose(" in conv_line
        if backward and max(size) > 7:
            return "conv weight-grad (XLA)"
        if backward or "rev(" in " ".join(lines):
            return "conv input-grad (XLA)"
        return "conv forward (XLA)"
    if "dot" in opcodes:
        return "dot (matmul)"
    if opcodes & {"reduce", "reduce-window"}:
        if "reduce-window" in opcodes:
            return "max-pool"
        return "reductions (BatchNorm stats, loss)"
    if "select-and-scatter" in opcodes:
        return "max-pool gradient"
    if opcodes & {"transpose", "copy"} and len(opcodes - {"transpose", "copy", "parameter",
                                                         "bitcast"}) == 0:
        return "copy / transpose"
    if "concatenate" in opcodes or "pad" in opcodes or "slice" in opcodes:
        return "concat / pad / slice"
    return "elementwise fusions"


def load_trace(directory: str) -> list[dict]:
    files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        files = glob.glob(os.path.join(directory, "**", "*.json.gz"), recursive=True)
    with gzip.open(sorted(files)[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(step, state, batch, steps: int) -> tuple[dict[str, float], float, object]:
    """Runs ``steps`` traced steps; returns (op name -> seconds per step, wall s, state)."""
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / steps
        events = load_trace(directory)
    durations = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            durations[event["name"]] += event.get("dur", 0.0) / 1e6 / steps
    return durations, wall, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--fast_conv", choices=["on", "off"], default="on")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    step, state, batch = build_lcseg_step(size=args.size, batch=args.batch,
                                          fast=args.fast_conv == "on", bf16=args.bf16)
    hlo = step.lower(state, batch).compile().as_text()
    instructions, computation_of, calls, entry = parse_hlo(hlo)
    state, metrics = step(state, batch)  # Compile and warm up.
    jax.block_until_ready(metrics)
    durations, wall, state = profile(step, state, batch, args.steps)

    ops = {name: seconds for name, seconds in durations.items() if name in instructions}
    categories = collections.Counter()
    for name, seconds in ops.items():
        category = categorize(name, instructions, computation_of, calls)
        if computation_of.get(name) != entry and category != "fast weight-grad loop":
            category += " (in loops)"
        categories[category] += seconds
    others = {name: s for name, s in durations.items() if name not in instructions}
    top_level = sum(categories.values())
    print(f"lcseg train step {args.batch}x{args.size}x{args.size} "
          f"{'bf16' if args.bf16 else 'f32'} fast_conv={args.fast_conv}: "
          f"{wall:.2f} s/step wall, {top_level:.2f} s in compiled ops "
          f"({args.batch / wall:.3f} img/s)")
    print(f"{'category':<46}{'s/step':>8}{'share':>8}")
    for category, seconds in sorted(categories.items(), key=lambda kv: -kv[1]):
        print(f"{category:<46}{seconds:8.3f}{seconds / max(top_level, 1e-9):8.1%}")
    print("\nruntime events (not compiled operations; they overlap them):")
    for name, seconds in sorted(others.items(), key=lambda kv: -kv[1])[:8]:
        print(f"{seconds:8.3f} s  {name[:80]}")
    print(f"\ntop {args.top} operations:")
    for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, opcode, _ = instructions[name]
        category = categorize(name, instructions, computation_of, calls)
        print(f"{seconds:8.3f} s  {name:<28} {category:<34} {shape[:60]}")


if __name__ == "__main__":
    main()
