"""Write the offline demo corpus (the Python standard library, split by file) and print its paths.

Usage: ``python calib/build_demo_corpus.py [--out DIR] [--max-chars N] [--seed S]``; the default
folder is ``$ORTHOQUANT_CACHE/demo-corpus`` (``~/.cache/orthoquant/demo-corpus``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orthoquant.demo import build_corpus, cache_dir  # noqa: E402
from orthoquant.progress import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the cache)")
    parser.add_argument("--max-chars", type=int, default=None, help="cap on total characters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file split")
    args = parser.parse_args(argv)
    setup_logging()
    out = args.out if args.out is not None else cache_dir() / "demo-corpus"
    for name, path in build_corpus(out, max_chars=args.max_chars, seed=args.seed).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
