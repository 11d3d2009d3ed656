"""`anima-ft` command line: one entry point, one subcommand per tool.

Each subcommand lives in the module that owns the work and exposes ``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("anima_ft.data.prepare_cli", "turn images + captions into pre-encoded webdataset shards"),
    "verify": ("anima_ft.data.verify", "check shards after a copy: index, checksums, decoding (exit 1 when damaged)"),
    "export": ("anima_ft.train.export", "ZeRO checkpoint -> one bf16 safetensors file in the official `net.` layout"),
    "probe": ("anima_ft.eval.probe_cli", "fixed-sigma forgetting probe on exported checkpoints (CSV + PNG)"),
    "plot": ("anima_ft.observability.run_plots", "loss / probe / LR curves of training runs as PNGs (no wandb needed)"),
    "drift": ("anima_ft.eval.drift", "per-tensor / per-group weight drift between checkpoints (table + heatmap)"),
    "swap": ("anima_ft.eval.swap", "compose a checkpoint from one file's DiT and another's adapter"),
    "distill": ("anima_ft.distill.cli", "teacher velocities and the redistribution attribution"),
    "lab": ("anima_ft.lab.run", "the CPU mini-lab: forgetting and replay on real images, end to end"),
}


def _usage() -> str:
    lines = ["usage: anima-ft COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``anima-ft COMMAND ...`` to the owning module's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"anima-ft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
