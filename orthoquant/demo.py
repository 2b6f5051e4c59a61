"""Offline demo model: a small Llama trained on the Python standard library's own sources.

Nothing can be downloaded here, but every machine with Python has its standard library: its modules
and docstrings are the corpus. :func:`build_corpus` splits it by file into train / valid / test (so
held-out perplexity is measured on files never trained on), :func:`train_tokenizer` fits a byte-level
BPE, :func:`train_model` trains a :class:`~transformers.LlamaForCausalLM` of a :class:`DemoSize`.
:func:`build_demo_model` does it all into the cache, once; :func:`build_test_model` builds the tiny one
the test session uses.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .cache import cache_dir
from .demo_data import (build_corpus, encode_long, split_documents, split_of, stdlib_files, stdlib_root,
                        train_tokenizer)
from .data import perplexity_windows
from .errors import DataError, UserError
from .evaluate import ppl

__all__ = [
    "DEMO", "TEST", "DemoSize", "build_corpus", "build_demo_model", "build_test_model", "cache_dir",
    "encode_long", "perplexity", "pick_threads", "split_documents", "split_of", "stdlib_files",
    "train_model", "train_tokenizer",
]

log = logging.getLogger(__name__)

MARKER = ".complete"  # written last: a folder without it is an interrupted build
# The test model's corpus: its 300 steps see ~300k of its ~510k training tokens, so it has not memorised its
# training text, and its held-out split (~650 windows of 64) is large enough that perplexity gaps
# between recipes are not sampling noise. On 300k characters (150 steps, 1.5 passes) its held-out
# predictions were overconfident: quantization noise then *lowered* held-out loss by about as much as
# its KL, and recipes ranked by luck (QuaRot W4A4KV4 over 8 rotation seeds: 38.50-38.84, FP 38.49).
TEST_CORPUS_CHARS = 1_200_000


# ------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class DemoSize:
    """Shape and training budget of a demo model (a Llama with grouped-query attention)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seqlen: int
    steps: int
    batch: int
    lr: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> LlamaConfig:
        """The model config; token ids follow :func:`train_tokenizer` (``<s>``, ``</s>``, ``<pad>`` first)."""
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            max_position_embeddings=2 * self.seqlen, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="float32",
        )


# The README demo. At a fixed 2-core budget, small and long beats wide and short (valid bits per
# character after ~6 CPU-minutes: hidden 128 / 4 layers 1.43-1.46, hidden 256 / 2 layers 1.62,
# hidden 256 / 4 layers 1.83). hidden 128 = one group of 128; intermediate 384 = 12 * 32 = 3 groups.
DEMO = DemoSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=1024,
                seqlen=256, steps=1000, batch=8, lr=3e-3)
# The test session's model: every dimension a multiple of 32, trained in seconds on one thread.
TEST = DemoSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, vocab=512,
                seqlen=64, steps=300, batch=16, lr=6e-3)


def pick_threads(size: DemoSize, steps: int = 2) -> int:
    """The torch thread count that trains ``size`` fastest right now, timed on a throwaway model.

    On an idle 2-core machine two threads train DEMO 1.8x faster than one; with other processes on
    the cores they were 10x slower (OpenMP threads wait on each other), so measure rather than guess.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    candidates = [n for n in (1, 2, 4) if n <= cores]
    x = torch.randint(0, size.vocab, (size.batch, size.seqlen), generator=torch.Generator().manual_seed(0))
    model = LlamaForCausalLM(size.config())
    timings: dict[int, float] = {}
    for n in candidates:
        with _threads(n):
            start = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()  # warm-up: first calls allocate
            warm = time.perf_counter() - start
            if timings and warm > 3 * min(timings.values()):
                timings[n] = warm  # hopeless: don't spend more steps proving it
                continue
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=x, labels=x).loss.backward()
            timings[n] = (time.perf_counter() - start) / steps
    best = min(timings, key=timings.get)
    log.info("seconds per step by thread count: %s; training with %d",
             {n: round(t, 3) for n, t in timings.items()}, best)
    return best


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # no weight decay on norms: decaying RMSNorm gains towards 0 only hurts
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _batches(windows: torch.Tensor, batch: int, steps: int, generator: torch.Generator,
             ) -> Iterator[torch.Tensor]:
    """``steps`` batches of windows, each window once per epoch, in seeded order."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(windows), generator=generator)])
        yield windows[order[:batch]]
        order = order[batch:]


def train_model(size: DemoSize, train_text: str, tokenizer, seed: int = 0, out_dir: Path | None = None,
                log_every: int = 50) -> LlamaForCausalLM:
    """Train a float32 :class:`LlamaForCausalLM` of ``size`` on ``train_text``, next-token loss.

    The text is tokenized and packed into non-overlapping ``size.seqlen`` windows; batches are drawn
    with a seeded generator; AdamW with warmup and cosine decay. With ``out_dir``, model and tokenizer
    are saved there (safetensors).
    """
    if len(tokenizer) != size.vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {size.vocab}")
    ids = encode_long(tokenizer, train_text)
    n_windows = len(ids) // size.seqlen
    if n_windows < 1:
        raise DataError(f"training text gives {len(ids)} tokens, fewer than one {size.seqlen}-token window")
    windows = ids[: n_windows * size.seqlen].view(n_windows, size.seqlen)
    log.info("training on %d windows of %d tokens, %d steps", n_windows, size.seqlen, size.steps)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(size.config()).float().train()
    optimizer = _optimizer(model, size.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, size.steps))
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(_batches(windows, size.batch, size.steps, generator), total=size.steps, desc="train")
    for step, x in enumerate(bar):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log_every and (step % log_every == 0 or step == size.steps - 1):
            log.info("step %d/%d loss %.4f", step + 1, size.steps, loss.item())
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return model


def perplexity(model, tokenizer, text: str, seqlen: int = 256, max_windows: int | None = None,
               batch: int = 8) -> float:
    """Perplexity of ``text`` cut into non-overlapping ``seqlen`` windows (the tail is dropped), as
    ``orthoquant eval`` measures it (:func:`orthoquant.evaluate.ppl.perplexity`)."""
    windows = perplexity_windows(encode_long(tokenizer, text)[None], seqlen)[:max_windows]
    return ppl.perplexity(model, windows, next(model.parameters()).device, batch)


# ------------------------------------------------------------------------------------------ build


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _corpus(corpus_dir: Path, max_chars: int | None, seed: int) -> dict[str, Path]:
    """The corpus in ``corpus_dir``, built unless a complete one with the same parameters is there."""
    stamp = json.dumps({"max_chars": max_chars, "seed": seed, "stdlib": str(stdlib_root())})
    marker = corpus_dir / MARKER
    names = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt", "train_jsonl": "train.jsonl"}
    if marker.is_file() and marker.read_text() == stamp:
        return {key: corpus_dir / name for key, name in names.items()}
    marker.unlink(missing_ok=True)
    paths = build_corpus(corpus_dir, max_chars=max_chars, seed=seed)
    marker.write_text(stamp)
    return paths


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished build into place, replacing only an earlier demo build or an empty folder."""
    if out_dir.exists():
        if (out_dir / MARKER).is_file() or (out_dir / "demo.json").is_file():
            shutil.rmtree(out_dir)
        elif not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            raise UserError(f"{out_dir} holds files that are not a demo model; choose another folder")
    try:
        tmp.rename(out_dir)
    except OSError:
        if not (out_dir / MARKER).is_file():
            raise
        log.warning("a concurrent build finished %s first; keeping that one", out_dir)


def _build(size: DemoSize, corpus_dir: Path, out_dir: Path, max_chars: int | None, seed: int) -> Path:
    """Corpus, tokenizer and model into ``out_dir``, via a temporary sibling so no half build is ever seen.

    The sibling's name is unique, so concurrent builds of one folder cannot mix files; the last wins.
    """
    start = time.perf_counter()
    paths = _corpus(corpus_dir, max_chars, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the installed model private
    docs = (json.loads(line)["text"] for line in paths["train_jsonl"].open(encoding="utf-8"))
    tokenizer = train_tokenizer(docs, size.vocab, None)
    model = train_model(size, paths["train"].read_text(encoding="utf-8"), tokenizer, seed, tmp)
    valid_ppl = perplexity(model, tokenizer, paths["valid"].read_text(encoding="utf-8"), size.seqlen, 32)
    info = {"size": asdict(size), "seed": seed, "corpus": str(corpus_dir), "max_chars": max_chars,
            "threads": torch.get_num_threads(), "valid_ppl_32_windows": round(valid_ppl, 3),
            "build_seconds": round(time.perf_counter() - start, 1)}
    (tmp / "demo.json").write_text(json.dumps(info, indent=2))
    (tmp / MARKER).write_text("")
    try:
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when install failed (a foreign folder)
    log.info("demo model in %s (valid ppl %.2f, %.0f s)", out_dir, valid_ppl, info["build_seconds"])
    return out_dir


def build_demo_model(out_dir: Path | None = None, force: bool = False) -> Path:
    """The README demo model: built once into ``cache_dir()/"demo-llama"`` (or ``out_dir``), then reused.

    The corpus goes to ``cache_dir()/"demo-corpus"``. A model folder counts as built only with its
    marker file, written last; ``force`` rebuilds model and corpus. Trains with ``$OMP_NUM_THREADS``
    threads when set (a pinned count makes the build bit-reproducible), else :func:`pick_threads`.
    """
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "demo-llama"
    if (out_dir / MARKER).is_file() and not force:
        log.info("demo model already built in %s", out_dir)
        return out_dir
    corpus_dir = cache_dir() / "demo-corpus"
    if force:
        (corpus_dir / MARKER).unlink(missing_ok=True)
    pinned = os.environ.get("OMP_NUM_THREADS", "")
    with _threads(int(pinned) if pinned.isdigit() and int(pinned) > 0 else pick_threads(DEMO)):
        return _build(DEMO, corpus_dir, out_dir, None, seed=0)


def build_test_model(out_dir: Path, seed: int = 0) -> Path:
    """The TEST size on a ``TEST_CORPUS_CHARS`` corpus, one thread: ``out_dir/"model"`` (returned).

    Its corpus is in ``out_dir/"corpus"`` (``valid.txt`` and ``test.txt`` are held out).
    """
    out_dir = Path(out_dir)
    with _threads(1):
        return _build(TEST, out_dir / "corpus", out_dir / "model", TEST_CORPUS_CHARS, seed)
