"""Launching ``orthoquant quantize`` under ``torchrun --nproc-per-node N``: the processes share the
learned-transform fit (data parallel, each frozen decoder layer sharded with FSDP2: see
:class:`~.residency.Sharded`); process 0 alone writes the run folder and runs the layer-wise solve.

Only a fit runs across processes, on ``cuda`` (NCCL, one GPU per process) or ``cpu`` (gloo); any
other launch is refused with one line before anything is written.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from ..config import Recipe
from ..errors import UserError
from .residency import world

def launched_processes() -> int:
    """How many processes the launcher started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(recipe: Recipe, device: torch.device, processes: int) -> None:
    """Refuse launches that several processes cannot serve (:class:`UserError`, one line)."""
    fit = recipe.fitting
    if fit is None or fit.released:
        raise UserError(f"launched with {processes} processes, but recipe '{recipe.name}' fits no transforms: only a "
                        "learned-transform fit runs across processes; run it as one process")
    if fit.offload != "none":
        raise UserError(f"fitting.offload={fit.offload} with {processes} processes: FSDP2 shards the weights across "
                        "the processes instead; drop fitting.offload or run one process")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device} with {processes} processes: use cuda (NCCL) or cpu (gloo)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and torch.cuda.device_count() <= local:
        raise UserError(f"process {local} of {processes} has no GPU ({torch.cuda.device_count()} visible): start at "
                        "most one process per GPU")


def init_from_launch(recipe: Recipe, device: torch.device) -> torch.device:
    """Join the launcher's process group (when launched with several processes); this process's device."""
    processes = launched_processes()
    if processes == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    check_launch(recipe, device, processes)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def on_first_process(fn: Callable[[], bool], device: torch.device) -> bool:
    """``fn()`` on process 0 only, its truth value on every process; a :class:`UserError` it raises is
    raised on every process, so that none is left waiting in a collective."""
    rank, size = world()
    outcome = ""
    if rank == 0:
        try:
            outcome = "T" if fn() else "F"
        except UserError as e:
            outcome = "E" + str(e)
    if size > 1:
        outcome = _broadcast_text(outcome, device)
    if outcome.startswith("E"):
        raise UserError(outcome[1:])
    return outcome == "T"


def _broadcast_text(text: str, device: torch.device) -> str:
    """Process 0's ``text`` on every process (as bytes in a tensor: nothing is pickled)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], device=device)
    dist.broadcast(length, src=0)
    buffer = data if world()[0] == 0 else torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if buffer.numel():
        dist.broadcast(buffer, src=0)
    return bytes(buffer.tolist()).decode()
