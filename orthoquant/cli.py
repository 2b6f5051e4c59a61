"""Command line: ``orthoquant quantize | eval | report | export | recipes``. Argparse lives here only;
every flag maps to a recipe field or an evaluation option. Bad input exits with code 2 and a one-line
reason. Kept import-light: a command's modules load only when it runs, so ``--help``, ``--version`` and
``recipes`` start without torch or transformers."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

log = logging.getLogger("orthoquant")

# CLI flag -> recipe field; the flags are shorthands for --set.
CALIB_FLAGS = {"calib": "calibration.source", "nsamples": "calibration.nsamples",
               "seqlen": "calibration.seqlen", "seed": "calibration.seed"}


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id or local Hugging Face folder")
    p.add_argument("--recipe", required=True, help="preset name (see `orthoquant recipes`) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--calib", help="wikitext2, c4, pile, or a .txt/.jsonl/datasets path")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, checkpoint dtype on CUDA) or a dtype")
    p.add_argument("--out", required=True, help="run folder (resumed if it holds the same run)")


def _eval_args(p: argparse.ArgumentParser, standalone: bool = True) -> None:
    """Evaluation flags; ``standalone`` for `orthoquant eval`, else after the quantize flags (one script).

    Task flags take lm-eval's own spellings too (``--num_fewshot``), so its users' commands carry over.
    """
    if standalone:
        p.add_argument("target", metavar="RUN|MODEL", help="run folder (quantized), exported checkpoint or model")
        p.add_argument("--seqlen", dest="eval_seqlen", type=int, help="window length (default min(2048, positions))")
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default="auto", help="auto (the model's own dtype for a run folder; "
                       "float32 on CPU otherwise) or float32, bfloat16, float16")
    else:
        p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, help="evaluation window length")
    p.add_argument("--ppl", default=None, help="comma-separated perplexity sources ('' for none; default "
                   "wikitext2, or none when --tasks is given, as lm_eval)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, groups, tags or suites "
                   "(quarot6, ostquant9); the package ships offline ones (oq_code_nextline, oq_code_ppl, oq_local)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--batch-size", "--batch_size", type=_batch_size, default=1, metavar="auto|N",
                   help="windows / requests per batch; auto: lm-eval picks its own, perplexity a safe one")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--stream", action="store_true", default=None, help="hold one layer at a time")
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--max-length", "--max_length", type=int,
                   help="task context length (default: the model's max_position_embeddings, at most 8192)")
    p.add_argument("--output-path", "--output_path", "-o", type=Path, metavar="PATH",
                   help="write lm-eval's own results file there (and samples with --log-samples), as lm_eval does")
    p.add_argument("--log-samples", "--log_samples", "-s", action="store_true",
                   help="also write every task document's inputs and outputs (needs --output-path)")
    p.add_argument("--apply-chat-template", "--apply_chat_template", nargs="?", const=True, default=False,
                   metavar="TEMPLATE", help="format prompts with the tokenizer's chat template (optionally named)")
    p.add_argument("--fewshot-as-multiturn", "--fewshot_as_multiturn", nargs="?", const=True, default=None,
                   type=lambda x: x.lower() in ("true", "1", "yes"), metavar="BOOL",
                   help="few-shot examples as chat turns (default: on with --apply-chat-template)")
    p.add_argument("--include-path", "--include_path", action="append", default=[], metavar="DIR",
                   help="folder of task YAMLs (repeatable); relative data paths in them resolve against it")
    p.add_argument("--limit", type=float, help="documents per task: a count, or a fraction when below 1")


def _batch_size(text: str) -> int | str:
    """``--batch-size``: ``auto`` or a count (checked for range with the other evaluation options)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither auto nor a whole number") from None


def recipe_from_args(args: argparse.Namespace):
    from .recipes import load_recipe

    sets = list(args.set) + [f"{field}={getattr(args, flag)}" for flag, field in CALIB_FLAGS.items()
                             if getattr(args, flag) is not None]
    return load_recipe(args.recipe, sets)


def cmd_quantize(args: argparse.Namespace) -> dict:
    from .device import resolve_device
    from .pipeline import quantize_pretrained

    from .fitting.distributed import init_from_launch
    from .fitting.residency import world

    recipe = recipe_from_args(args)
    device = init_from_launch(recipe, resolve_device(args.device))  # torchrun: join the fit's processes
    run = quantize_pretrained(args.model, recipe, args.out, device, args.dtype)
    if world()[0] != 0:
        return {}  # process 0 writes and reports the run
    log.info("run folder: %s", run.path)
    return run.info()


def show(text: str) -> None:
    """Print ``text``; a reader that closed the pipe (``| head``) must not stop the files being written."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise


def cmd_eval(args: argparse.Namespace) -> dict:
    from .device import resolve_device
    from .evaluate.lm_eval import TaskOptions
    from .evaluate.run_eval import choose_ppl_sources, measure
    from .validate import check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    tasks = TaskOptions.from_args(args)
    evaluation = measure(args.target, choose_ppl_sources(args.ppl, tasks), args.eval_seqlen,
                         resolve_device(args.device), args.dtype, args.batch_size, args.stream,
                         args.max_windows, tasks)
    text = json.dumps(evaluation.result, indent=2)
    show(text)  # first: when a write below fails, the numbers are already shown
    if args.json:
        with naming(args.json):
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
    with naming(Path(args.target)):
        evaluation.save()
    return evaluation.result


def cmd_recipes(args: argparse.Namespace) -> None:
    """Name and description of each preset, read from its YAML without loading the recipe (whose
    validation imports the formats and solvers it names, and torch with them)."""
    from .config_codec import parse_yaml
    from .recipes import preset_names, preset_text

    for name in preset_names():
        raw = parse_yaml(preset_text(name), f"preset {name}")
        show(f"{name:28s} {raw.get('description', '')}")


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, a function adding its flags, and the function running it.

    :param uses_torch: set up torch's threads before running (``recipes`` never imports torch).
    """

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]
    uses_torch: bool = True


@dataclass(frozen=True)
class Plugin:
    """A subcommand defined next to its feature: its ``--help`` line here, its :class:`Command` in
    ``module`` (imported only when the command runs, so ``--help`` stays fast)."""

    help: str
    module: str
    attr: str = "COMMAND"

    def load(self) -> Command:
        return getattr(importlib.import_module(self.module), self.attr)


# In the order a user needs them; the help lines are what `orthoquant --help` shows.
COMMANDS: dict[str, Command | Plugin] = {
    "quantize": Command("quantize a model with a recipe into a run folder", _quantize_args, cmd_quantize),
    "eval": Command("perplexity and lm-eval tasks of a run, an export or a model", _eval_args, cmd_eval),
    "report": Plugin("compare evaluated runs: one table and charts", "orthoquant.evaluate.report"),
    "export": Plugin("write a run as a checkpoint that stock runtimes load",
                     "orthoquant.export.command"),
    "recipes": Command("list the preset recipes, one line each", lambda p: None, cmd_recipes, uses_torch=False),
}
DESCRIPTION = ("Quantize Hugging Face causal language models (GPTQ, QuaRot, SpinQuant, OSTQuant, WUSH,\n"
               "QuIP#), evaluate them, compare them, and export them for transformers and vLLM.")
EPILOG = """examples:
  orthoquant recipes
  orthoquant quantize MODEL --recipe quarot-w4a4kv4 --calib wikitext2 --out runs/quarot
  orthoquant eval runs/quarot --ppl wikitext2 --tasks piqa,arc_easy
  orthoquant report runs/quarot runs/gptq --out runs/report
  orthoquant export runs/quarot --format native --out quarot-native
run `orthoquant COMMAND --help` for a command's options."""


def load_command(name: str) -> Command:
    entry = COMMANDS[name]
    return entry.load() if isinstance(entry, Plugin) else entry


def all_commands() -> dict[str, Command]:
    """Every command loaded (imports each plugin's module)."""
    return {name: load_command(name) for name in COMMANDS}


def command_name(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top-level options
    take no values), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser listing every command; only ``selected``'s flags are added (its module is imported)."""
    from .version import __version__

    parser = argparse.ArgumentParser(prog="orthoquant", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"orthoquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        command_parser = sub.add_parser(name, help=entry.help, description=entry.help)
        if name == selected:
            load_command(name).add_args(command_parser)
    return parser


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Name ``path`` in a filesystem error that names no file (a full disk fails a write, not an open)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def filesystem_error(e: Exception) -> OSError | None:
    """``e`` as an OSError if it is one: safetensors' writer reports I/O errors as ``SafetensorError``
    with the errno in its text ("... No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e
    code = _OS_ERROR_CODE.search(str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def describe_os_error(e: OSError, written: Path | None) -> str:
    """``PATH: reason``; a system error naming no file (a full disk) names ``written``, the folder the
    command writes; an OSError without errno (libraries raise them for missing files) is its message."""
    reason = e.strerror or str(e)
    if e.filename is not None:
        path = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{path}: {reason}"
    return f"{reason} (writing {written})" if written is not None and e.errno is not None else reason


def _fail(message: str) -> int:
    """One line on stderr, exit code 2 (run with -v for the traceback, logged at debug level)."""
    log.debug("details", exc_info=True)
    print("orthoquant: error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 2


def run_command(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a command: 0, or 2 after one line for bad input or a filesystem error anywhere in it."""
    try:
        run(args)
    except UserError as e:
        return _fail(str(e))
    except Exception as e:  # filesystem errors are reported here once, not around every write
        os_error = filesystem_error(e)
        if os_error is None:
            raise
        return _fail(describe_os_error(os_error, getattr(args, "out", None)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .progress import setup_logging, setup_threads

    argv = sys.argv[1:] if argv is None else list(argv)
    name = command_name(argv)
    args = build_parser(name if name in COMMANDS else None).parse_args(argv)
    command = load_command(args.command)
    setup_logging(args.verbose)
    if command.uses_torch:
        setup_threads()
    return run_command(command.run, args)


if __name__ == "__main__":
    sys.exit(main())
