"""The ``gradguard`` command line: ``gradguard demo`` (also ``python -m gradguard demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .demo import CASES, DEFAULT_STEPS

    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="gradguard watches gradients and activations while a PyTorch model trains.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a broken and a fixed model on scikit-learn's digits and show the diagnosis",
        description=(
            "Trains a model with a known problem and the same model fixed the way gradguard's "
            "advice says, on scikit-learn's bundled digits (no download), prints both "
            "reports and the accuracy difference, and writes TensorBoard logs. "
            "Needs: pip install 'gradguard[demo]'."
        ),
    )
    demo.add_argument(
        "--case",
        choices=list(CASES),
        default="vanishing",
        help="which problem to show (default: vanishing)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        help=f"optimizer steps per model (default: {DEFAULT_STEPS})",
    )
    demo.add_argument(
        "--logdir",
        default="runs/gradguard-demo",
        help="TensorBoard log directory (default: runs/gradguard-demo); 'none' disables it",
    )
    demo.add_argument(
        "--wandb",
        action="store_true",
        help="also log to Weights & Biases (offline unless you are logged in or WANDB_MODE is set)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .._errors import MissingDependencyError
        from .demo import DemoOptions, run_demo

        options = DemoOptions(
            case=args.case,
            steps=args.steps,
            logdir=None if args.logdir.lower() == "none" else args.logdir,
            wandb=args.wandb,
            seed=args.seed,
            progress=not args.no_progress,
        )
        try:
            run_demo(options)
        except MissingDependencyError as error:
            print(f"gradguard demo: {error}", file=sys.stderr)
            return 1
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits
