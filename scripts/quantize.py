#!/usr/bin/env python
"""Quantize a model and evaluate it, as one script.

    python scripts/quantize.py MODEL --recipe NAME|FILE [--set k=v ...] [--calib SRC] [--nsamples N]
        [--seqlen L] [--seed S] [--device cpu|cuda] --out RUN [--ppl SRC[,SRC...]] [--eval-seqlen L] [--json FILE]

The flags are those of `orthoquant quantize` plus the evaluation flags of `orthoquant eval`.
"""
from __future__ import annotations

import argparse
import json
import sys

from orthoquant.cli import _eval_args, _quantize_args, cmd_quantize
from orthoquant.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from orthoquant.device import resolve_device
    from orthoquant.evaluate.lm_eval import TaskOptions
    from orthoquant.evaluate.run_eval import evaluate
    from orthoquant.progress import setup_logging, setup_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _quantize_args(parser)
    _eval_args(parser, standalone=False)
    args = parser.parse_args(argv)
    setup_logging()
    setup_threads()
    try:
        cmd_quantize(args)
        sources = [s for s in args.ppl.split(",") if s]
        result = evaluate(args.out, sources, args.eval_seqlen, resolve_device(args.device), args.dtype,
                          args.batch_size, args.stream, args.max_windows, TaskOptions.from_args(args))
    except UserError as e:
        print(f"quantize.py: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
