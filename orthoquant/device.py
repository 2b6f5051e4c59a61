"""Device and dtype choice. The only module that names CUDA."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None picks CUDA when present. Asking for absent CUDA is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types orthoquant does not run on
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return device


def resolve_dtype(name: str, device: torch.device, config_dtype: torch.dtype | None = None) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 matmuls are slow there) and the checkpoint's dtype on CUDA."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if isinstance(config_dtype, str):
            config_dtype = DTYPES.get(config_dtype)
        return config_dtype or torch.bfloat16
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on an accelerator since the last reset, None on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MAPPED_FROM = 1 << 20  # blocks from this size on are mmap-ed once use_mmap_for_large_blocks ran
_TRIM_DEFAULT = 128 * 1024  # glibc's trim threshold once the thresholds are set explicitly
_HEAP_MAX_BLOCK = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
_large_blocks_mapped = False


@lru_cache(maxsize=1)
def use_mmap_for_large_blocks() -> None:
    """Serve blocks over 1 MiB with mmap, returned to the system when freed.

    Otherwise glibc raises its mmap threshold after the first large free and carves later layers'
    weights out of a heap that only grows, so peak memory would creep up with depth. Call it before
    the first model-sized allocation (building the skeleton): blocks already in the heap stay there.
    """
    global _large_blocks_mapped
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM)
        _large_blocks_mapped = True


@contextmanager
def reusing_freed_blocks() -> Iterator[None]:
    """Keep freed blocks (up to 32 MiB) in the heap for reuse meanwhile, then map large blocks again and
    give the heap's free memory back (``malloc_trim``; the loop's tensors are freed by reference
    counting, so no garbage collection, which takes a quarter of a second with transformers loaded).

    For loops that allocate and free the same activations every step (learned rounding, QuIP#'s
    fine-tuning): under :func:`use_mmap_for_large_blocks` each step would map, fault in and unmap
    fresh pages, which cost a third of a learned-rounding step on CPU. Only what the loop allocates is
    kept meanwhile; nothing changes unless large blocks are mapped.
    """
    libc = _libc()
    if not _large_blocks_mapped:
        yield
        return
    libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_MAX_BLOCK * 2)
    libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MAX_BLOCK)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
        libc.malloc_trim(0)


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """Meanwhile, garbage collections skip the objects alive on entry (``gc.freeze``): the imported
    libraries' million objects made each of :func:`release_memory`'s full collections take 0.16–0.25 s
    (a fifth of a 4-layer GPTQ run), while the cycles worth collecting, if any, are the ones made since.
    Objects alive on entry are still freed by reference counting; they are collectable again on exit."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory(device: torch.device | None = None) -> None:
    """Give freed memory back after a layer is offloaded, so peak use stays flat in depth.

    glibc keeps freed multi-megabyte blocks in its heap and fragments it layer after layer;
    ``malloc_trim`` returns them to the system. On CUDA the caching allocator is emptied.
    """
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
