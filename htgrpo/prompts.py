"""``python -m htgrpo.prompts geneval_train out=FILE n=N seed=S exclude=EVAL_FILE`` — held-out training prompts.

Writes ``n`` GenEval-style prompts with their GenEval metadata (the schema of GenEval's
``evaluation_metadata.jsonl``: one ``{"tag", "include", ["exclude"], "prompt"}`` object per line), drawn from
GenEval's six task templates over its 80 objects, ten colours, counts 2-4 and four relations
(:mod:`htgrpo.data.geneval_train`). No written prompt equals a prompt of the evaluation file named by ``exclude``.

Arguments (``key=value``):

* ``out``: the output file (``.jsonl``); an existing folder gets ``train_metadata.jsonl`` inside. Required.
* ``n``: number of prompts, shared equally over the tasks (a task with fewer held-out prompts than its share
  gives the rest to the others). Required.
* ``seed``: draw seed (integer >= 0, default 0); the same arguments always write the same file.
* ``exclude``: the evaluation file to hold out, GenEval's ``prompts/evaluation_metadata.jsonl`` or its folder.
  Required: pass ``exclude=none`` to generate without holding anything out (then the file may contain
  evaluation prompts, and ``fit`` stops when training and validation prompts overlap).
* ``tasks``: comma-separated subset of the six tasks (default: all six).

Prints one row per task (template prompts, those in the evaluation file, available, written) and the ``fit``
overrides that use the file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from htgrpo.data.records import GENEVAL_TASKS, MetadataError

COMMANDS = ("geneval_train",)
_KEYS = ("out", "n", "seed", "exclude", "tasks")
TRAIN_FILE_NAME = "train_metadata.jsonl"
"""File name written inside an ``out`` folder (the name MaskGRPO and flow_grpo give their GenEval training set)."""

_USAGE = ("usage: python -m htgrpo.prompts geneval_train out=FILE n=N [seed=S] exclude=EVAL_FILE|none "
          "[tasks=single_object,two_object,...]")


class UsageError(ValueError):
    """A bad command line; the message says which argument and what to pass."""


def parse_args(argv: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``[command, key=value, ...]`` -> (command, {key: value}); unknown commands or keys raise UsageError."""
    if not argv or argv[0] not in COMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        raise UsageError(f"expected a command, one of {list(COMMANDS)}, got {got}\n{_USAGE}")
    args: dict[str, str] = {}
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS:
            raise UsageError(f"unknown argument {item!r}: expected key=value with key in {list(_KEYS)}\n{_USAGE}")
        if key in args:
            raise UsageError(f"{key} is given twice ({key}={args[key]} and {item})")
        args[key] = value
    return argv[0], args


def _int(args: dict[str, str], key: str, default: int | None, minimum: int) -> int:
    if key not in args:
        if default is None:
            raise UsageError(f"{key} is required: pass {key}=<integer >= {minimum}>\n{_USAGE}")
        return default
    try:
        value = int(args[key])
    except ValueError:
        raise UsageError(f"{key}={args[key]}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise UsageError(f"{key}={value}: expected an integer >= {minimum}")
    return value


def geneval_train(args: dict[str, str]) -> Path:
    """Generate, write, read back and check a GenEval-style training file; returns its path."""
    from htgrpo.data.geneval_train import generate_geneval_training_prompts
    from htgrpo.data.loaders import load_geneval_metadata, write_geneval_metadata
    from htgrpo.data.train_val_overlap import prompt_key

    if not args.get("out"):
        raise UsageError(f"out is required: pass out=FILE.jsonl (or an existing folder)\n{_USAGE}")
    n = _int(args, "n", None, 1)
    seed = _int(args, "seed", 0, 0)
    if "exclude" not in args or not args["exclude"]:
        raise UsageError("exclude is required: pass exclude=<GenEval's prompts/evaluation_metadata.jsonl> (the "
                         "prompts to hold out), or exclude=none to hold nothing out\n" + _USAGE)
    tasks = tuple(t.strip() for t in args.get("tasks", ",".join(GENEVAL_TASKS)).split(",") if t.strip())
    bad = [t for t in tasks if t not in GENEVAL_TASKS]
    if bad or not tasks:
        raise UsageError(f"tasks={args.get('tasks')}: unknown task(s) {bad}; pick from {list(GENEVAL_TASKS)}")
    exclude_path = None if args["exclude"].lower() == "none" else Path(args["exclude"]).expanduser()
    held_out = [r.prompt for r in load_geneval_metadata(exclude_path)] if exclude_path is not None else []

    try:
        generated = generate_geneval_training_prompts(n, seed, held_out, tasks)
    except ValueError as err:
        raise UsageError(f"n={n}: {err}") from None
    out = Path(args["out"]).expanduser()
    if out.is_dir():
        out = out / TRAIN_FILE_NAME
    path = write_geneval_metadata(generated.records, out)
    # Read the file back through the loader fit uses: the schema holds, and no line is an evaluation prompt.
    written = load_geneval_metadata(path)
    held_out_keys = {prompt_key(p) for p in held_out}
    clash = [r.prompt for r in written if prompt_key(r.prompt) in held_out_keys]
    if clash or len(written) != n:
        raise RuntimeError(f"{path}: {len(written)} records read back (expected {n}), {len(clash)} equal to an "
                           f"evaluation prompt, e.g. {clash[:1]}")

    source = f"{exclude_path} ({len(held_out)} prompts)" if exclude_path is not None else "nothing (exclude=none)"
    print(f"wrote {len(written)} GenEval-style training prompts to {path} (seed {seed}); held out: {source}")
    print("| task | template prompts | evaluation prompts | available | written |")
    print("|---|---|---|---|---|")
    for c in generated.counts:
        print(f"| {c.tag} | {c.pool} | {c.excluded} | {c.available} | {c.written} |")
    for c in generated.counts:
        if c.available == 0:
            print(f"{c.tag}: all {c.pool} of its prompts are evaluation prompts, so the file has none")
    if exclude_path is None:
        print("warning: nothing was held out; train on this file only with a validation set it does not overlap")
    else:
        print(f"train on it: python -m htgrpo.fit experiment=mmada_ht data.train.path={path} "
              f"benchmark.prompts.path={exclude_path} ...")
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, args = parse_args(argv)
        if command == "geneval_train":
            return geneval_train(args)
        raise UsageError(f"unknown command {command!r}")  # pragma: no cover - parse_args checks it
    except (UsageError, FileNotFoundError, MetadataError) as err:
        raise SystemExit(f"htgrpo.prompts: {err}") from None


if __name__ == "__main__":
    main()
