#!/usr/bin/env python
"""Quantize a model and evaluate it, as one script.

    python scripts/quantize.py MODEL --recipe NAME|FILE [--set k=v ...] [--calib SRC] [--nsamples N]
        [--seqlen L] [--seed S] [--device cpu|cuda] --out RUN [--ppl SRC[,SRC...]] [--eval-seqlen L] [--json FILE]

The flags are those of `orthoquant quantize` plus the evaluation flags of `orthoquant eval`; errors are
reported as the CLI reports them (one line, exit code 2).
"""
from __future__ import annotations

import argparse
import sys

from orthoquant.cli import _eval_args, _quantize_args, cmd_eval, cmd_quantize, run_command
from orthoquant.validate import check_output_file


def quantize_and_evaluate(args: argparse.Namespace) -> None:
    if args.json:  # checked before quantizing, not after
        check_output_file(args.json, "--json")
    cmd_quantize(args)
    cmd_eval(argparse.Namespace(**vars(args), target=args.out))


def main(argv: list[str] | None = None) -> int:
    from orthoquant.progress import setup_logging, setup_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _quantize_args(parser)
    _eval_args(parser, standalone=False)
    args = parser.parse_args(argv)
    setup_logging()
    setup_threads()
    return run_command(quantize_and_evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
