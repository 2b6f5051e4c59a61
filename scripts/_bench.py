"""What every ``scripts/bench_*.py`` shares: the import path, timing, peak memory, markdown tables and
synthetic layers.

Importing this module makes ``orthoquant`` importable from a checkout that is not installed (a bench
is run as ``python scripts/bench_x.py``, which puts ``scripts/`` on the path, not the repository root),
so a bench imports it before the package.
"""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

try:
    import orthoquant  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orthoquant.evaluate.results import table  # noqa: E402

T = TypeVar("T")


# --- timing ----------------------------------------------------------------------------------------

def sync(device: str | torch.device) -> None:
    """Wait for queued kernels: a CUDA call returns before its work is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: str | torch.device = "cpu") -> tuple[T, float]:
    """(result, seconds) of one call of ``fn``, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


@dataclass(frozen=True)
class Times:
    """Seconds of repeated calls; ``best`` is the usual figure (a shared CPU only ever adds time)."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def repeat_times(fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu",
                 warmup: bool = True) -> Times:
    """Times of ``repeats`` calls of ``fn``, after one untimed call when ``warmup`` (first calls load kernels)."""
    if warmup:
        timed(fn, device)
    return Times(tuple(timed(fn, device)[1] for _ in range(repeats)))


# --- memory ----------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), or earlier frees hide the peak of what follows."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Memory high-water mark of a ``with`` block: CUDA's allocator on CUDA, else the process RSS
    sampled every :attr:`INTERVAL_S` in a thread.

    :ivar base_mib: memory in use when the block started (MiB).
    :ivar high_mib: the high-water mark during the block (MiB).
    :ivar peak_mib: ``high_mib − base_mib``: what the block added at its peak.
    """

    INTERVAL_S = 0.002

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base_mib = self.high_mib = self.peak_mib = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._high = max(self._high, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _release_freed_memory()
            self._base = self._high = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            high = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            high = max(self._high, _rss_bytes())
        self.base_mib, self.high_mib = self._base / 2**20, high / 2**20
        self.peak_mib = self.high_mib - self.base_mib


# A child process that runs ``orthoquant ARGS`` and prints its own peak. VmHWM, not ru_maxrss: at exec
# Linux folds the pre-exec address space's peak (the bench's, which may have built a large model) into
# the child's ru_maxrss; VmHWM is the high-water mark of the child's own address space since exec.
_CLI_CHILD = """
import resource, sys
from orthoquant.cli import main
code = main(sys.argv[1:])
status = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith(("Vm", "Rss"))}
print("PEAK_KB", status["VmHWM"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("STATUS", " ".join(f"{k}:{status[k]}" for k in ("RssAnon", "RssFile")))
sys.exit(code)
"""


@dataclass(frozen=True)
class ChildPeak:
    """What :func:`cli_peak` measured: VmHWM and ru_maxrss (MB) and the RSS split at exit."""

    peak_mb: float
    maxrss_mb: float
    at_exit: str


def cli_peak(args: list[str], pythonpath: str | None = None) -> ChildPeak:
    """Run ``orthoquant ARGS`` in a fresh process (with ``pythonpath`` first on its path) and return its peak."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    proc = subprocess.run([sys.executable, "-c", _CLI_CHILD, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"orthoquant {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    hwm_kb, maxrss_kb = [line for line in lines if line.startswith("PEAK_KB")][-1].split()[1:]
    status = [line for line in lines if line.startswith("STATUS")][-1]
    return ChildPeak(int(hwm_kb) / 1024, int(maxrss_kb) / 1024, status[len("STATUS "):])


# --- models and data -------------------------------------------------------------------------------

def random_llama(folder: Path, layers: int, hidden: int, intermediate: int, tokenizer) -> int:
    """Save a random Llama (head size 64, 2 query heads per KV head) with ``tokenizer`` in ``folder``;
    returns its parameter bytes (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


def calibration_text(folder: Path):
    """(path of a repetitive calibration text written in ``folder``, a 320-token tokenizer trained on it)."""
    from orthoquant.demo import train_tokenizer

    text = " ".join(f"token{i % 97} word{i % 13}" for i in range(60000))
    path = folder / "calib.txt"
    path.write_text(text)
    return path, train_tokenizer([text], 320, None)


def synthetic_layer(m: int, n: int, device: str | torch.device = "cpu", seed: int = 0,
                    rank: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (m, n) float32 and second moment H (n, n) float64 of correlated activations with noisy
    channels: ``x = z·A + ε``, z ~ N(0, diag(1/(k+1))) of rank ``rank``, A ~ N(0, 1), ε with log-normal
    per-channel scales. H is that expectation in closed form (``Aᵀ diag(s) A + diag(σ²)``), so building
    it costs rank·n² instead of tokens·n² (wide layers need no token sample)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n**0.5
    r = min(rank, n)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float64)
    sigma = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    H = A.T @ (s[:, None] * A) + torch.diag(0.1 * sigma**2)
    return W.to(device), H.to(device)


def factor_layer(m: int, n: int, tokens: int, seed: int = 0, rank: int = 64,
                 outliers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (m, n) and activations X (tokens, n), float32, for errors measured on the activations
    themselves (activation quantization needs samples, not only H): a rank-``rank`` factor model with
    decaying factor variances, 0.1 noise, log-normal channel scales and ``outliers`` channels (default
    1%) 20x louder; the weight's columns have log-normal scales too."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g) / torch.arange(1, rank + 1) ** 0.5
    x = z @ torch.randn(rank, n, generator=g) + 0.1 * torch.randn(tokens, n, generator=g)
    scale = torch.exp(0.5 * torch.randn(n, generator=g))
    scale[torch.randperm(n, generator=g)[: max(1, n // 100) if outliers is None else outliers]] *= 20
    W = torch.randn(m, n, generator=g) * torch.exp(0.5 * torch.randn(n, generator=g)) / n**0.5
    return W, x * scale


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 ``E[x xᵀ]`` over the rows of ``x`` (..., n)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / x.shape[0]


# --- output ----------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (:func:`orthoquant.evaluate.results.table`) as one string."""
    return "\n".join(table(header, rows))


def publish(table_text: str, rows: list[dict], args) -> None:
    """Print ``table_text``; where ``args.out`` is set, write the arguments, rows and table there as JSON."""
    print(table_text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "table": table_text}, indent=2))
