"""Build orthoquant/hadamard/data/hadamards.safetensors: the stored ±1 H_K tables, int8, keyed by str(K).

Source, in order:

1. ``--source PATH`` or, when compressed-tensors is installed, its
   ``compressed_tensors/transform/utils/hadamards.safetensors`` (Apache-2.0; the tables credit
   N. J. A. Sloane's library of Hadamard matrices, the same ones SpinQuant/QuaRot hard-code —
   e.g. had12 row for row);
2. otherwise the Paley constructions, for the orders that have one (the Williamson orders
   92, 116, 156, 172, 188, 236 have none and are then left out, with a warning).

Stored orders: the 4·odd orders up to 172 used by QuaRot/QuIP#/SpinQuant (12, 20, 28, 36, 52, 60,
108, 140, 156, 172) plus the other 4·odd orders ≤ 256 that no Paley construction reaches (92, 116,
188, 236), so that every order 4·odd ≤ 256 has a matrix. 40 = 8·5 is left out: the factorisation
always picks 20 for it. Every matrix is checked for ±1 entries and ``H Hᵀ = K·I`` before writing.

    python scripts/build_hadamard_data.py [--source PATH | --construct] [--out PATH]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from orthoquant.hadamard.paley import paley_hadamard, paley_source

ORDERS = (12, 20, 28, 36, 52, 60, 92, 108, 116, 140, 156, 172, 188, 236)
OUT = Path(__file__).resolve().parents[1] / "orthoquant" / "hadamard" / "data" / "hadamards.safetensors"
logger = logging.getLogger("build_hadamard_data")


def _ct_source() -> tuple[Path, str] | None:
    """compressed-tensors' table file and a provenance label, when it is installed."""
    spec = importlib.util.find_spec("compressed_tensors")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "transform" / "utils" / "hadamards.safetensors"
    version = importlib.metadata.version("compressed-tensors")
    label = f"compressed-tensors {version} transform/utils/hadamards.safetensors"
    return (path, label) if path.exists() else None


def _verified(h: torch.Tensor, k: int) -> torch.Tensor:
    hd = h.double()
    assert h.shape == (k, k) and bool(hd.abs().eq(1).all()), f"H_{k}: not a ±1 {k}×{k} matrix"
    assert torch.equal(hd @ hd.T, k * torch.eye(k, dtype=torch.float64)), f"H_{k}: H Hᵀ != {k}·I"
    return h.to(torch.int8).contiguous()


def collect(source: tuple[Path, str] | None) -> tuple[dict[str, torch.Tensor], str]:
    """The verified tables and a provenance string.

    :param source: (table file, label) to copy from, or None to construct.
    """
    if source is not None:
        tables = load_file(str(source[0]))
        out = {str(k): _verified(tables[str(k)], k) for k in ORDERS}
        return out, f"copied from {source[1]}"
    out = {}
    for k in ORDERS:
        h = paley_hadamard(k)
        if h is None:
            logger.warning("no source for H_%d (not a Paley order): left out", k)
            continue
        out[str(k)] = _verified(h, k)
    return out, "Paley constructions: " + ", ".join(f"{k}={paley_source(int(k))}" for k in out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None, help="a hadamards.safetensors to copy from")
    ap.add_argument("--construct", action="store_true", help="ignore compressed-tensors; use Paley")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.source:
        source = (args.source, f"{args.source.name} (--source)")
    else:
        source = None if args.construct else _ct_source()
    tables, provenance = collect(source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(b"".join(tables[k].numpy().tobytes() for k in sorted(tables, key=int)))
    orders = ",".join(sorted(tables, key=int))
    meta = {"provenance": provenance, "orders": orders, "sha256": digest.hexdigest()}
    save_file(tables, str(args.out), metadata=meta)
    logger.info("wrote %s: K = %s (%s)", args.out, meta["orders"], provenance)


if __name__ == "__main__":
    main()
