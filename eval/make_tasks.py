"""Regenerate the data of the offline tasks in ``orthoquant/evaluate/tasks/`` (package data) from the Python standard library.

Usage: ``python eval/make_tasks.py``. The data comes from the demo corpus's held-out *test* files
(``orthoquant.demo_data.split_of(path, seed=0) == "test"``), so the demo model never trained on it.
The JSONL files are committed: a different Python version would pick other lines, and results must
not move with the interpreter. Rerun only to change the tasks on purpose.

- ``oq_code_nextline`` (multiple choice): six lines of code, then the true next line among four;
  the three distractors are lines of the same file, away from it, with its indentation and length.
- ``oq_code_ppl`` (rolling log-likelihood): the start of a few held-out files.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orthoquant.demo_data import split_documents  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "orthoquant" / "evaluate" / "tasks"
SEED = 1234
MC_DOCS, CONTEXT_LINES, N_CHOICES = 64, 6, 4
PPL_DOCS, PPL_CHARS = 4, 1500
_TRIVIAL = {"pass", "else:", "try:", "finally:", "return", "break", "continue", ")", "]", "}", '"""'}


def _usable(line: str) -> bool:
    """A line worth predicting: code of moderate length, not a comment or a lone keyword."""
    body = line.strip()
    return 12 <= len(line) <= 72 and body not in _TRIVIAL and not body.startswith("#")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _candidates(docs: list[tuple[str, str]]) -> list[tuple[str, int, list[str], str]]:
    """(file, line number, context lines, answer line) for every usable line with a full context."""
    out = []
    for rel, text in docs:
        lines = text.split("\n")
        for i in range(CONTEXT_LINES, len(lines)):
            context = lines[i - CONTEXT_LINES:i]
            if _usable(lines[i]) and all(c.strip() for c in context[-2:]) and len("\n".join(context)) <= 320:
                out.append((rel, i, context, lines[i]))
    return out


def _distractors(rng: random.Random, pool: list[tuple[str, int, list[str], str]], rel: str, at: int,
                 answer: str) -> list[str]:
    """Lines of the same file, away from the answer, with its indentation and nearly its length.

    Same file: its identifiers then appear in every choice, so only the context tells the answer
    (lines from other files made rare-identifier answers lose to generic lines, below chance).
    """
    alike = {line for r, i, _, line in pool if r == rel and abs(i - at) > CONTEXT_LINES and line != answer
             and _indent(line) == _indent(answer) and abs(len(line) - len(answer)) <= max(3, len(answer) // 5)}
    return rng.sample(sorted(alike), N_CHOICES - 1)


def multiple_choice(docs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    pool = _candidates(docs)
    rows = []
    for rel, at, context, answer in rng.sample(pool, 8 * MC_DOCS):
        if len(rows) == MC_DOCS:
            break
        try:
            choices = _distractors(rng, pool, rel, at, answer) + [answer]
        except ValueError:  # too few lines alike: take another question
            continue
        rng.shuffle(choices)
        rows.append({"file": rel, "context": "\n".join(context) + "\n", "choices": choices,
                     "label": choices.index(answer)})
    return rows


def rolling(docs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    rows = []
    for rel, text in rng.sample(docs, PPL_DOCS):
        cut = text.rfind("\n", 0, PPL_CHARS)  # whole lines only
        rows.append({"file": rel, "text": text[: cut if cut > 0 else PPL_CHARS]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{path}: {len(rows)} rows, {path.stat().st_size} bytes")


def main() -> int:
    docs = sorted(split_documents(seed=0)["test"])
    write_jsonl(TASKS / "oq_code_nextline" / "data.jsonl", multiple_choice(docs, random.Random(SEED)))
    write_jsonl(TASKS / "oq_code_ppl" / "data.jsonl", rolling(docs, random.Random(SEED + 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
