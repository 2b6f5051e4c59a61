"""lm-eval tasks on an in-memory model, quantized or not: paper suites, the metric each reports.

The model goes to lm-eval as an object (``HFLM(pretrained=model, tokenizer=...)``), so a run folder
is scored exactly as :mod:`orthoquant.evaluate.ppl` scores it: fake-quant hooks and online transforms
stay active. lm-eval is imported only when tasks are asked for (``pip install 'orthoquant[eval]'``).

Metric convention. QuaRot's and SpinQuant's ``main.py`` and OSTQuant's evaluation all take
``result.get('acc_norm,none', result['acc,none'])``: ``acc_norm`` where the lm-eval task defines it
(piqa, hellaswag, arc_easy, arc_challenge, openbookqa), else ``acc`` (winogrande, lambada_openai, boolq,
social_iqa). :data:`TASK_METRICS` spells that out per task, so a paper's average is reproduced; any
other task reports the first metric of :data:`METRIC_PREFERENCE` it has (all metrics are kept too).

Rolling perplexity differs from :func:`orthoquant.evaluate.ppl.perplexity` by design: lm-eval scores
every token of each document, the first one conditioned on ``prefix_token_id`` (BOS), in windows of
``max_length`` predicted tokens whose input starts one token back (so a window boundary costs no
context); ours scores ``seqlen``-token windows of the joined text and never predicts a window's first
token. Its perplexities are per word / byte, not per token. ``tests/evaluate/test_eval.py`` pins the relation.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .task_paths import LOCAL_TASKS, resolved_task_dirs

log = logging.getLogger(__name__)

SUITES: dict[str, tuple[str, ...]] = {
    "quarot6": ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada_openai"),
    "ostquant9": ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada_openai",
                  "boolq", "openbookqa", "social_iqa"),
}
# The headline metric of a task: the papers' choice for their suites; per byte for our code task,
# whose whitespace-split "words" are long and make word perplexities astronomical.
TASK_METRICS: dict[str, str] = {
    "piqa": "acc_norm", "winogrande": "acc", "hellaswag": "acc_norm", "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm", "lambada_openai": "acc", "boolq": "acc", "openbookqa": "acc_norm",
    "social_iqa": "acc", "oq_code_ppl": "byte_perplexity",
}
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity", "perplexity",
                     "byte_perplexity", "bits_per_byte")
# lm-eval's own defaults, recorded with every result (simple_evaluate's random/numpy/torch/fewshot seeds)
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
_INFO_KEYS = {"alias", "name", "sample_len"}  # lm-eval bookkeeping, not metrics


@dataclass(frozen=True)
class TaskOptions:
    """What to evaluate and how, named as lm-eval's command line names it.

    :param tasks: lm-eval task, group or tag names, or suite names (:data:`SUITES`).
    :param max_length: context length; ``None`` uses the perplexity seqlen.
    :param fewshot_as_multiturn: ``None``: on exactly when a chat template is applied (lm-eval's rule).
    :param include_paths: task folders besides the package's offline tasks (``evaluate/tasks``).
    :param limit: documents per task (a count, or a fraction when below 1).
    :param bootstrap_iters: resamples for the stderr of non-mean metrics (0: none, stderr "N/A").
    :param output_path: where lm-eval's own results file (and samples) go, as ``lm_eval --output_path``.
    :param log_samples: also write every document's inputs and outputs there (``--log_samples``).
    """

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    batch_size: int | str = 1
    max_length: int | None = None
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None
    include_paths: tuple[str, ...] = ()
    limit: float | None = None
    bootstrap_iters: int = 1000
    output_path: str | None = None
    log_samples: bool = False

    def __post_init__(self) -> None:
        if self.log_samples and not self.output_path:  # lm-eval's own rule
            raise UserError("--log-samples needs --output-path (the folder the samples are written to)")

    @classmethod
    def from_args(cls, args) -> "TaskOptions":
        """From the flags of ``orthoquant eval`` (``orthoquant.cli._eval_args``)."""
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        output = getattr(args, "output_path", None)
        return cls(tuple(t for t in args.tasks.split(",") if t), args.num_fewshot, args.batch_size,
                   args.max_length, args.apply_chat_template, args.fewshot_as_multiturn,
                   tuple(args.include_path), limit, output_path=str(output) if output else None,
                   log_samples=bool(getattr(args, "log_samples", False)))

    def task_folders(self) -> list[str]:
        return ([str(LOCAL_TASKS)] if LOCAL_TASKS.is_dir() else []) + list(self.include_paths)


def expand_tasks(names: list[str] | tuple[str, ...]) -> list[str]:
    """Task names with suites expanded, in order, each once."""
    out: list[str] = []
    for name in names:
        out += [t for t in SUITES.get(name, (name,)) if t not in out]
    return out


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as e:
        raise UserError(f"--tasks needs lm-eval ({e.name} is missing): pip install 'orthoquant[eval]'") from None
    return lm_eval, HFLM, TaskManager


def _task_manager(TaskManager, folders: list[str], names: list[str]):
    """lm-eval's task index; its 5-second default index is read only when a name is not local."""
    local = TaskManager(include_path=folders or None, include_defaults=False)
    manager = local if all(n in local.all_tasks for n in names) else TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, 3) for n in unknown}
        raise UserError("unknown lm-eval task(s): " + "; ".join(
            f"{n} (did you mean {', '.join(h)}?)" if h else n for n, h in hints.items()))
    return manager


# Context lengths above this are truncation limits no task needs, and rolling-perplexity tasks would
# score windows of that many tokens at once; `--max-length` raises it.
MAX_LENGTH_CAP = 8192


def default_max_length(model) -> int:
    """The model's own context (``max_position_embeddings``, as stock lm-eval reads it), capped at
    :data:`MAX_LENGTH_CAP`; 2048 (lm-eval's fallback) when the config names none."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(positions, MAX_LENGTH_CAP) if isinstance(positions, int) and positions > 0 else 2048


def check_chat_template(tokenizer, template: bool | str) -> None:
    """``--apply-chat-template`` needs a tokenizer that has a chat template (the named one, if named)."""
    if template is False:
        return
    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        raise UserError("--apply-chat-template: the tokenizer has no chat template (a base model's usually "
                        "has none); drop the flag, or evaluate the instruction-tuned model")
    if isinstance(template, str) and isinstance(templates, dict) and template not in templates:
        raise UserError(f"--apply-chat-template {template}: the tokenizer's chat templates are {sorted(templates)}")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _offline_error(error: Exception, names: list[str]) -> UserError | None:
    """A one-line error for a task whose dataset is on the hub while the hub is offline."""
    if not _hub_offline():
        return None
    text = " ".join(str(error).split())
    if "offline" not in text.lower() and not isinstance(error, ConnectionError):
        return None
    return UserError(f"--tasks {','.join(names)}: a task's dataset is on the Hugging Face hub, which is offline "
                     f"(HF_HUB_OFFLINE) and not in the local cache; use local tasks (oq_local, --include-path) "
                     f"or allow the hub ({type(error).__name__}: {text[:160]})")


def _tracker(options: TaskOptions):
    """lm-eval's ``EvaluationTracker`` writing where ``lm_eval --output_path`` would, or None."""
    if not options.output_path:
        return None
    from lm_eval.loggers import EvaluationTracker

    return EvaluationTracker(output_path=options.output_path)


def _save(tracker, raw: dict[str, Any], log_samples: bool) -> None:
    """Write lm-eval's results (and samples) files exactly as its command line does."""
    samples = raw.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=raw, samples=samples)
    for task in raw["configs"] if samples else ():
        tracker.save_results_samples(task_name=task, samples=samples[task])


def run_tasks(model, tokenizer, options: TaskOptions, max_length: int | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate ``options.tasks`` on ``model`` (in memory) with lm-eval; see :func:`summarize`.

    The context length is ``options.max_length``, else ``max_length``, else :func:`default_max_length`.
    """
    check_chat_template(tokenizer, options.apply_chat_template)
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = expand_tasks(options.tasks)
    chat = options.apply_chat_template
    multiturn = bool(chat) if options.fewshot_as_multiturn is None else options.fewshot_as_multiturn
    tracker = _tracker(options)
    with resolved_task_dirs(options.task_folders()) as folders:
        manager = _task_manager(TaskManager, folders, names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size,
                  max_length=options.max_length or max_length or default_max_length(model))
        log.info("lm-eval %s on %s (max_length %d)", lm_eval_version(), ", ".join(names), lm.max_length)
        try:
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=manager, num_fewshot=options.num_fewshot,
                limit=options.limit, apply_chat_template=chat, fewshot_as_multiturn=multiturn,
                log_samples=options.log_samples, evaluation_tracker=tracker,
                bootstrap_iters=options.bootstrap_iters, **SEEDS)
        except Exception as e:
            offline = _offline_error(e, names)
            if offline is None:
                raise
            raise offline from None
    if tracker is not None:
        _save(tracker, raw, options.log_samples)
    return summarize(raw)


def _number(value: Any) -> float | None:
    """A metric value for JSON: floats as is, lm-eval's "N/A" stderr and NaN as None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def headline_metric(task: str, metrics: dict[str, Any]) -> str | None:
    """The lm-eval key (``"acc_norm,none"``) a paper would report for ``task``, if it has one."""
    order = (TASK_METRICS[task],) if task in TASK_METRICS else METRIC_PREFERENCE
    for name in order:
        keys = sorted(k for k in metrics if k.split(",")[0] == name and _number(metrics[k]) is not None)
        if keys:
            return f"{name},none" if f"{name},none" in keys else keys[0]
    return None


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: ``metric`` and ``value`` (the headline), ``higher_is_better``, every numeric metric
    under lm-eval's key, the number of documents scored, the few-shot count and the task version."""
    out = {}
    for task, metrics in raw["results"].items():
        key = headline_metric(task, metrics)
        metric = key.split(",")[0] if key else None
        out[task] = {
            "metric": metric, "value": _number(metrics[key]) if key else None,
            "higher_is_better": raw.get("higher_is_better", {}).get(task, {}).get(metric),
            "metrics": {k: _number(v) for k, v in metrics.items() if k not in _INFO_KEYS},
            "samples": raw.get("n-samples", {}).get(task, {}).get("effective"),
            "num_fewshot": raw.get("n-shot", {}).get(task), "version": raw.get("versions", {}).get(task),
        }
    return out


def suite_averages(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean headline metric of each suite all of whose tasks were evaluated."""
    return {name: sum(tasks[t]["value"] for t in members) / len(members) for name, members in SUITES.items()
            if all(tasks.get(t, {}).get("value") is not None for t in members)}
