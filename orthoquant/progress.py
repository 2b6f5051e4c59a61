"""Logging set-up for the command line (the library itself only logs)."""
from __future__ import annotations

import logging
import os


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_threads() -> None:
    """Honour OMP_NUM_THREADS for torch too (oversubscribed cores make small ops 10-40x slower)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        import torch  # here: commands that never use torch must not pay for importing it

        torch.set_num_threads(int(n))
