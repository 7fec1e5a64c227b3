"""Command-line options shared by the SVEB scripts for the model they run in-process."""

from __future__ import annotations

import argparse


def add_backend_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model, --device and --threads."""
    parser.add_argument("--model", default="embedded", help=model_help)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is much faster on a busy machine",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count when --threads asks for one."""
    if args.threads > 0:
        import torch  # late: the scripts import torch only once their arguments are valid

        torch.set_num_threads(args.threads)
