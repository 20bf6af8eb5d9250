"""``python -m bench SUBCOMMAND [options]``: flexpbs's benchmark harness (run from the repository root).

Most subcommands need a CUDA GPU; ``memory``, ``traffic``, ``calibrate``, ``stages --count-ops``,
``quality`` and the ``--cpu-smoke`` modes of ``stress`` and ``robustness`` run on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module of bench, summary). Only the chosen subcommand's module is imported, so that
# one subcommand's dependencies (matplotlib, transformers, Triton) are not every subcommand's.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "speed": ("speed", "GPU: flexpbs against dense and sparse baselines, end to end, on the same inputs"),
    "stages": ("stages", "GPU: each pipeline stage timed alone; --count-ops: operators per stage (CPU)"),
    "profile": ("profile_call", "GPU: kernel time of one call, kernel by kernel and stage by stage"),
    "host": ("host", "GPU: host time of each stage issued behind a busy GPU"),
    "levers": ("levers", "GPU: what each speed lever buys (kernel options, compile, CUDA graph, ...)"),
    "breakeven": (
        "breakeven",
        "GPU: the length from which PBS beats dense cuDNN, and what the defaults give",
    ),
    "coldstart": ("coldstart", "GPU: first-call latency at new lengths, chunks and in generate"),
    "varlen": ("varlen", "GPU: a packed batch in one call against its sequences one by one, padding, dense"),
    "tp": ("tp", "GPUs (torchrun): one attention layer with its heads split over GPUs"),
    "memory": ("memory_model", "CPU: memory of each stage counted on the meta device, any length"),
    "traffic": ("traffic", "CPU: bytes each stage moves (meta device), a packed batch against its singles"),
    "stress": ("stress", "random shapes against the reference, bounded in time (GPU, or --cpu-smoke)"),
    "robustness": (
        "robustness",
        "memory, int32 offsets, determinism, numerics at scale (GPU, or --cpu-smoke)",
    ),
    "quality": ("quality", "SmolLM2 on real texts: perplexity, passkey, per-head recall (CPU), and reports"),
    "calibrate": (
        "calibrate",
        "CPU: density of the synthetic workload at threshold 0.9, per length and draw",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level takes no options
    run = None
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name != chosen:
            subparsers.add_parser(name, help=summary)
            continue
        module = importlib.import_module(f"{__package__}.{module_name}")
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        run = module.run
    args = parser.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
