"""Build the offline demo model (corpus, tokenizer, small Llama) into the cache unless already built.

Usage: ``python scripts/make_demo_model.py [--out DIR] [--force]``; prints the model folder. The
default is ``$ORTHOQUANT_CACHE/demo-llama`` (``~/.cache/orthoquant/demo-llama``), the corpus goes to
``demo-corpus`` beside it. About five minutes on two CPU cores; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orthoquant.demo import build_demo_model  # noqa: E402
from orthoquant.errors import UserError  # noqa: E402
from orthoquant.progress import setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="model folder (default: the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild corpus and model")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        print(build_demo_model(args.out, force=args.force))
    except UserError as err:
        logging.getLogger("make_demo_model").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
