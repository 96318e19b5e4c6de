"""Strict readers and writers for the official GenEval and DPG-Bench prompt files.

Everything here turns the files into the typed records of :mod:`htgrpo.data.records`. The readers check
the schema strictly and refuse anything they do not understand. Every problem raises
:class:`~htgrpo.data.records.MetadataError` with a message that names

* the source (``path/evaluation_metadata.jsonl:17``, or ``path/dpg_bench.csv:42`` with the header as line 1),
* the key or column (``include[1].position``, ``dependency``),
* what was found, and what is expected or what to do.

Files:

* GenEval: ``prompts/evaluation_metadata.jsonl`` from github.com/djghosh13/geneval. It has one JSON object
  per line with the keys ``tag``, ``include``, optional ``exclude`` and ``prompt``.
  :func:`write_geneval_metadata` writes the same format. Reading the official file and writing it back
  gives the same bytes (``json.dumps`` defaults, ``\\n`` line ends).
* DPG-Bench (github.com/TencentQQGYLab/ELLA, folder ``dpg_bench/``): ``prompts/<item_id>.txt`` and
  ``dpg_bench.csv``. The CSV has one row per question and the columns ``DPG_CSV_COLUMNS``. A
  ``prompts.jsonl`` index (``{"item_id", "prompt"}`` per line) can stand in for the prompt folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from htgrpo.data.records import (
    DPG_CSV_COLUMNS,
    GENEVAL_RECORD_EXAMPLE,
    BenchmarkPrompt,
    DPGItem,
    DPGProposition,
    GenEvalRecord,
    MetadataError,
    parse_geneval_record,
)
from htgrpo.data.records import found_text as _show
from htgrpo.data.records import is_plain_int as _is_int
from htgrpo.data.records import schema_error as _error

__all__ = [
    "GENEVAL_METADATA_NAME",
    "DPG_CSV_NAME",
    "parse_geneval_record",
    "load_geneval_metadata",
    "write_geneval_metadata",
    "load_dpg_prompts",
    "load_dpg_csv",
    "write_dpg_csv",
    "load_dpg",
    "to_benchmark_prompts",
]

PathLike = Union[str, "os.PathLike[str]"]

GENEVAL_METADATA_NAME = "evaluation_metadata.jsonl"
"""File name of GenEval's metadata inside its ``prompts/`` folder."""

DPG_CSV_NAME = "dpg_bench.csv"
"""File name of DPG-Bench's question table inside ELLA's ``dpg_bench/`` folder."""

_GENEVAL_HOWTO = (
    "get it from the GenEval repository (github.com/djghosh13/geneval, file prompts/evaluation_metadata.jsonl; "
    "a copy is under shared/data/geneval/) and pass that file or the folder holding it"
)
_DPG_PROMPTS_HOWTO = (
    "get the prompt files from the ELLA repository (github.com/TencentQQGYLab/ELLA, folder dpg_bench/prompts/; "
    "a copy is under shared/data/dpg_bench/) and pass that folder, its parent, or a prompts.jsonl index"
)
_DPG_CSV_HOWTO = (
    "fetch dpg_bench.csv from the ELLA repository (github.com/TencentQQGYLab/ELLA, dpg_bench/dpg_bench.csv, "
    "commit 3c228f1) and pass that file or the folder holding it; without it only generation is possible "
    "(load_dpg(prompts_path, None))"
)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetadataError(
            f"{path}: the file is not valid UTF-8 ({e}); expected UTF-8 text ({what}); re-save it as UTF-8"
        ) from None


def _id_list(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"[{shown}]{more}"


# ----------------------------------------------------------------------------------------------------------
# GenEval
# ----------------------------------------------------------------------------------------------------------


def _geneval_file(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        f = p / GENEVAL_METADATA_NAME
        if not f.is_file():
            raise FileNotFoundError(f"GenEval metadata not found: the folder {p} has no {GENEVAL_METADATA_NAME}; {_GENEVAL_HOWTO}")
        return f
    if not p.is_file():
        raise FileNotFoundError(f"GenEval metadata not found: {p} does not exist; {_GENEVAL_HOWTO}")
    return p


def load_geneval_metadata(path: PathLike) -> list[GenEvalRecord]:
    """Read GenEval's ``evaluation_metadata.jsonl``, one :class:`GenEvalRecord` per line, in file order.

    Args:
        path: the jsonl file, or a folder containing ``evaluation_metadata.jsonl``.

    The list index is the image folder index GenEval uses (``<outdir>/<index:05d>/``). Blank lines are
    rejected, because GenEval's own scripts read every line as JSON.

    Raises:
        FileNotFoundError: the file is missing. The message says which path, and how to get the file.
        MetadataError: bad JSON (``file:line`` and the JSON error) or a schema violation
            (see :func:`parse_geneval_record`).
    """
    f = _geneval_file(path)
    text = _read_text(f, "GenEval metadata, one JSON object per line")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    records: list[GenEvalRecord] = []
    for lineno, line in enumerate(lines, start=1):
        source = f"{f}:{lineno}"
        if not line.strip():
            raise MetadataError(
                f"{source}: blank line; expected one JSON object per line (GenEval's scripts parse every line); "
                "remove the blank line"
            )
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise MetadataError(
                f"{source}: invalid JSON ({e}); expected one JSON object per line, e.g. {GENEVAL_RECORD_EXAMPLE}"
            ) from None
        except _DuplicateKey as e:
            raise _error(source, e.key, "the key twice in one object", "each key once", "remove the duplicate") from None
        records.append(parse_geneval_record(obj, source))
    if not records:
        raise MetadataError(f"{f}: the file is empty; expected GenEval records, one JSON object per line")
    return records


def write_geneval_metadata(records: Iterable[GenEvalRecord], path: PathLike) -> Path:
    """Write records as GenEval's ``evaluation_metadata.jsonl`` (the official formatting).

    Each line is ``json.dumps(record.to_json())`` with the keys in the order tag, include, [exclude], prompt,
    followed by ``\\n``. Reading the official file and writing it back gives the same bytes. Every record is
    checked with :func:`parse_geneval_record` before anything is written.

    Args:
        records: the records, in index order.
        path: the output file, or an existing folder, in which case ``evaluation_metadata.jsonl`` is written
            inside it. Parent folders are created.

    Returns:
        The path of the file written.
    """
    p = Path(path)
    if p.is_dir():
        p = p / GENEVAL_METADATA_NAME
    lines = []
    for i, rec in enumerate(records):
        if not isinstance(rec, GenEvalRecord):
            raise TypeError(f"records[{i}]: expected a GenEvalRecord, got {type(rec).__name__}")
        obj = rec.to_json()
        parse_geneval_record(obj, f"records[{i}] (to be written to {p})")
        lines.append(json.dumps(obj) + "\n")
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(lines)
    return p


# ----------------------------------------------------------------------------------------------------------
# DPG-Bench prompts
# ----------------------------------------------------------------------------------------------------------


def _check_item_id(item_id: Any, source: str, key: str) -> str:
    if not isinstance(item_id, str) or not item_id or item_id != item_id.strip() or "/" in item_id or "\\" in item_id:
        raise _error(
            source,
            key,
            _show(item_id),
            "a non-empty item id without surrounding spaces or slashes (the prompt file stem, e.g. \"partiprompts97\")",
        )
    return item_id


def _load_prompt_folder(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix != ".txt" or not f.is_file() or f.name.startswith("."):
            continue
        item_id = _check_item_id(f.stem, str(f), "item_id (file name)")
        prompt = _read_text(f, "one DPG-Bench prompt").strip()
        if not prompt:
            raise MetadataError(
                f"{f}: the prompt file is empty; expected the prompt text of item {item_id!r}; "
                "restore the file from ELLA's dpg_bench/prompts/ or delete it"
            )
        out[item_id] = prompt
    if not out:
        raise MetadataError(f"{folder}: no <item_id>.txt prompt files found; {_DPG_PROMPTS_HOWTO}")
    return out


def _load_prompt_index(f: Path) -> dict[str, str]:
    text = _read_text(f, 'a DPG-Bench prompt index, one {"item_id", "prompt"} object per line')
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out: dict[str, str] = {}
    for lineno, line in enumerate(lines, start=1):
        source = f"{f}:{lineno}"
        if not line.strip():
            raise MetadataError(f'{source}: blank line; expected one {{"item_id", "prompt"}} object per line; remove it')
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise MetadataError(
                f'{source}: invalid JSON ({e}); expected one object {{"item_id": ..., "prompt": ...}} per line'
            ) from None
        except _DuplicateKey as e:
            raise _error(source, e.key, "the key twice in one object", "each key once") from None
        if not isinstance(obj, dict):
            raise _error(source, "<record>", _show(obj), 'an object {"item_id": ..., "prompt": ...}')
        for k in obj:
            if k not in ("item_id", "prompt"):
                raise _error(source, str(k), f"unknown key {_show(k)}", "only the keys ['item_id', 'prompt']")
        for k in ("item_id", "prompt"):
            if k not in obj:
                raise _error(source, k, "nothing (key missing)", "a non-empty string")
        item_id = _check_item_id(obj["item_id"], source, "item_id")
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise _error(source, "prompt", _show(prompt), f"the prompt text of item {item_id!r} (a non-empty string)")
        if item_id in out:
            raise _error(source, "item_id", _show(item_id), "each item id once", "remove the duplicate line")
        out[item_id] = prompt.strip()
    if not out:
        raise MetadataError(f"{f}: the file is empty; expected one {{\"item_id\", \"prompt\"}} object per line")
    return out


def load_dpg_prompts(path: PathLike) -> list[DPGItem]:
    """Read the DPG-Bench prompts, as items without questions, sorted by ``item_id`` (string order).

    Args:
        path: one of
            * ELLA's ``dpg_bench/prompts/`` folder of ``<item_id>.txt`` files;
            * a folder containing that ``prompts/`` folder (or, failing that, a ``prompts.jsonl``);
            * a ``prompts.jsonl`` index with one ``{"item_id", "prompt"}`` object per line.

    Leading and trailing whitespace is stripped from each prompt. Two official files end in whitespace
    (``countbench4``, ``diffusiondb25``). After stripping, the folder and the index give identical items.

    Raises:
        FileNotFoundError: nothing at ``path``.
        MetadataError: an empty prompt file (the file is named), bad index lines (``file:line``), or duplicate ids.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix != ".jsonl":
            raise MetadataError(
                f"{p}: expected the DPG-Bench prompts/ folder, its parent, or a prompts.jsonl index; "
                f"found a {p.suffix or 'suffix-less'} file"
            )
        prompts = _load_prompt_index(p)
    elif p.is_dir():
        if any(f.suffix == ".txt" and f.is_file() for f in p.iterdir()):
            prompts = _load_prompt_folder(p)
        elif (p / "prompts").is_dir():
            prompts = _load_prompt_folder(p / "prompts")
        elif (p / "prompts.jsonl").is_file():
            prompts = _load_prompt_index(p / "prompts.jsonl")
        else:
            raise FileNotFoundError(
                f"DPG-Bench prompts not found: {p} has no <item_id>.txt files, no prompts/ folder and no "
                f"prompts.jsonl; {_DPG_PROMPTS_HOWTO}"
            )
    else:
        raise FileNotFoundError(f"DPG-Bench prompts not found: {p} does not exist; {_DPG_PROMPTS_HOWTO}")
    return [DPGItem(item_id=k, prompt=prompts[k]) for k in sorted(prompts)]


# ----------------------------------------------------------------------------------------------------------
# DPG-Bench CSV
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _CsvItem:
    text: str
    keywords: str
    line: int
    props: list[tuple[int, DPGProposition]]  # (line, proposition)


def _categories_from_tuple(tup: str) -> tuple[str, str]:
    """(L1, L2 detail) the way compute_dpg_bench.py derives them: L2 = part before "(", L1 = part of it before "-"."""
    l2_full = tup.split("(")[0].strip()
    l1 = l2_full.split("-")[0].strip()
    detail = l2_full.split("-", 1)[1].strip() if "-" in l2_full else ""
    return l1, detail


_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")


def _parse_int(value: str, source: str, column: str, expected: str) -> int:
    if not _INT_RE.fullmatch(value):
        raise _error(source, column, _show(value), expected)
    return int(value)


def _dpg_csv_file(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        f = p / DPG_CSV_NAME
        if not f.is_file():
            raise FileNotFoundError(f"DPG-Bench questions not found: the folder {p} has no {DPG_CSV_NAME}; {_DPG_CSV_HOWTO}")
        return f
    if not p.is_file():
        raise FileNotFoundError(f"DPG-Bench questions not found: {p} does not exist; {_DPG_CSV_HOWTO}")
    return p


def _read_dpg_csv(path: PathLike) -> tuple[Path, dict[str, _CsvItem]]:
    f = _dpg_csv_file(path)
    items: dict[str, _CsvItem] = {}
    last_item: str | None = None
    warned_split: list[str] = []
    try:
        fh = open(f, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise MetadataError(f"{f}: cannot open ({e})") from None
    with fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        col: dict[str, int] = {}
        prev_line = 0
        data_row = -1  # 0-based index of the data row, as pandas' iterrows() counts (blank lines skipped)
        try:
            for row in reader:
                line = prev_line + 1  # physical line where this record starts (header = line 1)
                prev_line = reader.line_num
                if not row:  # blank line (pandas skips them too)
                    continue
                if header is None:
                    header = row
                    dups = sorted({c for c in row if row.count(c) > 1})
                    missing = [c for c in DPG_CSV_COLUMNS if c not in row]
                    extra = [c for c in row if c not in DPG_CSV_COLUMNS]
                    if dups or missing or extra:
                        problems = []
                        if missing:
                            problems.append(f"missing columns {missing}")
                        if extra:
                            problems.append(f"unexpected columns {extra}")
                        if dups:
                            problems.append(f"duplicated columns {dups}")
                        raise MetadataError(
                            f"{f}:{line}: key 'header': found {', '.join(problems)}; expected exactly the columns "
                            f"{','.join(DPG_CSV_COLUMNS)} (DPG-Bench's dpg_bench.csv); fix the header row"
                        )
                    col = {c: row.index(c) for c in DPG_CSV_COLUMNS}
                    continue
                source = f"{f}:{line}"
                data_row += 1
                if len(row) != len(header):
                    raise _error(
                        source,
                        "<row>",
                        f"{len(row)} fields",
                        f"{len(header)} fields ({','.join(header)})",
                        "quote fields that contain commas",
                    )
                v = {c: row[i] for c, i in col.items()}
                item_id = v["item_id"]
                if not item_id.strip():
                    raise _error(source, "item_id", _show(item_id), "the prompt id, e.g. \"partiprompts97\"")
                pid = _parse_int(v["proposition_id"], source, "proposition_id", "an integer >= 1")
                if pid < 1:
                    raise _error(source, "proposition_id", _show(v["proposition_id"]), "an integer >= 1 (0 means 'no parent')")
                dep_text = v["dependency"]
                deps = []
                for part in dep_text.split(","):
                    d = _parse_int(
                        part, source, "dependency", "comma-separated integer proposition ids, \"0\" for no parent"
                    )
                    if d < 0:
                        raise _error(source, "dependency", _show(dep_text), "proposition ids >= 0 (\"0\" = no parent)")
                    if d == pid:
                        raise _error(source, "dependency", _show(dep_text), "parent ids other than the question's own id")
                    deps.append(d)
                tup = v["tuple"]
                if not tup.strip():
                    raise _error(source, "tuple", _show(tup), "a DSG tuple like \"entity - whole (cat)\"")
                question = v["question_natural_language"]
                if not question.strip():
                    raise _error(source, "question_natural_language", _show(question), "a yes/no question")
                broad, detailed = v["category_broad"].strip(), v["category_detailed"].strip()
                t_broad, t_detailed = _categories_from_tuple(tup)
                if not broad:
                    if not t_broad:
                        raise _error(
                            source,
                            "category_broad",
                            f"{_show(v['category_broad'])} and nothing to derive it from in tuple {_show(tup)}",
                            "an L1 category, or a tuple like \"<broad> - <detailed> (args)\"",
                        )
                    broad = t_broad
                if not detailed:
                    detailed = t_detailed
                prop = DPGProposition(
                    proposition_id=pid,
                    dependency=tuple(deps),
                    category_broad=broad,
                    category_detailed=detailed,
                    tuple=tup,
                    question=question,
                    row=data_row,
                )
                item = items.get(item_id)
                if item is None:
                    item = items[item_id] = _CsvItem(text=v["text"], keywords=v["keywords"], line=line, props=[])
                elif last_item != item_id and item_id not in warned_split:
                    warned_split.append(item_id)
                for other_line, other in item.props:
                    if other.proposition_id == pid:
                        raise _error(
                            source,
                            "proposition_id",
                            _show(v["proposition_id"]),
                            f"a proposition id not used before for item {item_id!r}",
                            f"line {other_line} already has it",
                        )
                item.props.append((line, prop))
                last_item = item_id
        except csv.Error as e:
            raise MetadataError(f"{f}:{reader.line_num}: malformed CSV ({e}); expected RFC-4180 CSV") from None
        except UnicodeDecodeError as e:
            raise MetadataError(f"{f}: the file is not valid UTF-8 ({e}); re-save it as UTF-8") from None
    if header is None:
        raise MetadataError(f"{f}: the file is empty; expected the header {','.join(DPG_CSV_COLUMNS)} and question rows")
    if not items:
        raise MetadataError(f"{f}: no question rows after the header; expected one row per proposition")
    if warned_split:
        warnings.warn(
            f"{f}: the rows of items {_id_list(warned_split)} are not contiguous; they are all loaded here, but "
            "DPG-Bench's compute_dpg_bench.py keeps only the last block of each item; group the rows by item_id",
            stacklevel=3,
        )
    for item_id, item in items.items():
        ids = {p.proposition_id for _, p in item.props}
        for line, p in item.props:
            for d in p.parents:
                if d not in ids:
                    raise _error(
                        f"{f}:{line}",
                        "dependency",
                        _show(",".join(str(x) for x in p.dependency)),
                        f"ids of propositions of item {item_id!r} ({sorted(ids)}) or 0",
                        f"proposition {d} does not exist",
                    )
        item.props.sort(key=lambda lp: lp[1].proposition_id)
    return f, items


def load_dpg_csv(path: PathLike) -> dict[str, tuple[DPGProposition, ...]]:
    """Read DPG-Bench's ``dpg_bench.csv`` into ``{item_id: propositions}``.

    Items appear in the order of their first row. Each item's propositions are sorted by
    ``proposition_id``.

    Args:
        path: the CSV file, or a folder containing ``dpg_bench.csv``.

    Rules:
        * The header must have exactly the columns ``DPG_CSV_COLUMNS``, in any order. A bad header
          error names the missing and the extra columns.
        * ``proposition_id`` is an integer >= 1 and unique within its item.
        * ``dependency`` is a comma-separated list of integers. ``0`` means no parent. Every other id must be
          a proposition of the same item.
        * ``category_broad`` and ``category_detailed`` are filled in from ``tuple`` when empty, the way the
          official scorer derives them: L2 is the part of ``tuple`` before ``"("``, and L1 is the part of that
          before ``"-"``. ``category_detailed`` keeps only the text after the ``"-"``.
        * The first data row is read like every other row. The official ``compute_dpg_bench.py`` has
          ``if i == 0: continue`` inside its ``iterrows()`` loop. That skips the first question (of
          ``partiprompts97``), an off-by-one bug (ELLA issue #61) that is not copied here; each proposition keeps its
          0-based data row (``row``), and the DPG scorer's ``skip_first_row`` switch reproduces the skip.
        * If an item's rows are not contiguous, they are all loaded and a warning is raised. The official
          reader keeps only the last block of such an item.

    Raises:
        FileNotFoundError: the file is missing. The message says where to fetch it.
        MetadataError: for a bad row, with ``file:line`` (the CSV line number, header = line 1), the column
            and the value.
    """
    _, items = _read_dpg_csv(path)
    return {k: tuple(p for _, p in it.props) for k, it in items.items()}


def write_dpg_csv(items: Sequence[DPGItem], path: PathLike) -> Path:
    """Write items as a DPG-Bench ``dpg_bench.csv``: one row per proposition, columns ``DPG_CSV_COLUMNS``.

    ``text`` is the item's prompt and ``keywords`` is the item's keywords. Rows follow the item order, and
    within an item the ``proposition_id`` order. ``dependency`` is written comma-separated, and an empty
    dependency becomes ``"0"``. Lines end in ``\\n``. Every item needs at least one proposition, and every
    dependency must point at a proposition of the same item. Both are checked before anything is written.

    Args:
        items: the items to write.
        path: the output file, or an existing folder (``dpg_bench.csv`` is written inside). Parent folders
            are created.

    Returns:
        The path written.
    """
    p = Path(path)
    if p.is_dir():
        p = p / DPG_CSV_NAME
    rows: list[list[str]] = [list(DPG_CSV_COLUMNS)]
    seen: set[str] = set()
    for i, item in enumerate(items):
        src = f"items[{i}] (to be written to {p})"
        if not isinstance(item, DPGItem):
            raise TypeError(f"items[{i}]: expected a DPGItem, got {type(item).__name__}")
        _check_item_id(item.item_id, src, "item_id")
        if item.item_id in seen:
            raise _error(src, "item_id", _show(item.item_id), "each item id once")
        seen.add(item.item_id)
        if not item.propositions:
            raise _error(
                src, "propositions", "none", "at least one proposition (DPG-Bench has only items with questions)"
            )
        ids = [q.proposition_id for q in item.propositions]
        if len(set(ids)) != len(ids):
            raise _error(src, "propositions", f"proposition ids {ids}", "unique proposition ids")
        for q in sorted(item.propositions, key=lambda q: q.proposition_id):
            if not _is_int(q.proposition_id) or q.proposition_id < 1:
                raise _error(src, "proposition_id", _show(q.proposition_id), "an integer >= 1")
            for d in q.parents:
                if d not in ids or d == q.proposition_id:
                    raise _error(
                        src,
                        f"propositions[id={q.proposition_id}].dependency",
                        _show(list(q.dependency)),
                        f"ids of other propositions of item {item.item_id!r} ({sorted(ids)}) or 0",
                    )
            rows.append(
                [
                    {
                        "item_id": item.item_id,
                        "text": item.prompt,
                        "keywords": item.keywords,
                        "proposition_id": str(q.proposition_id),
                        "dependency": ",".join(str(d) for d in q.dependency) or "0",
                        "category_broad": q.category_broad,
                        "category_detailed": q.category_detailed,
                        "tuple": q.tuple,
                        "question_natural_language": q.question,
                    }[c]
                    for c in DPG_CSV_COLUMNS
                ]
            )
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return p


def load_dpg(prompts_path: PathLike, csv_path: PathLike | None = None) -> list[DPGItem]:
    """DPG-Bench items, meaning the prompts joined with their questions, sorted by ``item_id``.

    Args:
        prompts_path: see :func:`load_dpg_prompts`.
        csv_path: ``dpg_bench.csv`` (see :func:`load_dpg_csv`). If it is None, the items come back
            without propositions. That is generation-only mode: images can be made but not scored.

    With a CSV, the prompt text comes from the prompt files and the keywords from the CSV. Every CSV item
    needs a prompt, and every prompt needs questions. Otherwise a MetadataError lists up to 5 of the
    offending ids. If the CSV's ``text`` differs from the prompt file (after stripping spaces), a warning
    is raised.
    """
    prompts = load_dpg_prompts(prompts_path)
    if csv_path is None:
        return prompts
    f, table = _read_dpg_csv(csv_path)
    by_id = {it.item_id: it for it in prompts}
    no_prompt = sorted(k for k in table if k not in by_id)
    if no_prompt:
        raise MetadataError(
            f"{f}: key 'item_id': found {len(no_prompt)} item ids without a prompt in {prompts_path}: "
            f"{_id_list(no_prompt)}; expected every CSV item to have a prompt file <item_id>.txt; "
            "check that the prompts and the CSV come from the same DPG-Bench version"
        )
    no_questions = [it.item_id for it in prompts if it.item_id not in table]
    if no_questions:
        raise MetadataError(
            f"{prompts_path}: key 'item_id': found {len(no_questions)} prompts without questions in {f}: "
            f"{_id_list(no_questions)}; expected every prompt to have rows in the CSV; add their questions, "
            "remove those prompt files, or pass csv_path=None for generation only"
        )
    mismatched = [it.item_id for it in prompts if table[it.item_id].text.strip() != it.prompt]
    if mismatched:
        warnings.warn(
            f"{f}: the 'text' column differs from the prompt file for {len(mismatched)} items "
            f"{_id_list(mismatched)}; the prompt files are used for generation",
            stacklevel=2,
        )
    return [
        DPGItem(
            item_id=it.item_id,
            prompt=it.prompt,
            propositions=tuple(p for _, p in table[it.item_id].props),
            keywords=table[it.item_id].keywords,
        )
        for it in prompts
    ]


# ----------------------------------------------------------------------------------------------------------
# served prompts
# ----------------------------------------------------------------------------------------------------------


def to_benchmark_prompts(
    records: Sequence[Union[GenEvalRecord, DPGItem]], benchmark: str
) -> list[BenchmarkPrompt]:
    """Wrap records as :class:`BenchmarkPrompt` for a data module.

    * For GenEval records, ``key`` is the 5-digit zero-padded list index, the name of GenEval's output folder
      (``00017``), and ``group`` is the tag. Pass the full list in file order, so the indices match.
    * For DPG items, ``key`` is the ``item_id`` and ``group`` is ``"dpg"``.

    All records must have the same type. Duplicate DPG item ids are rejected.
    """
    if not isinstance(benchmark, str) or not benchmark:
        raise ValueError(f"benchmark: expected a non-empty name, got {benchmark!r}")
    records = list(records)
    if not records:
        return []
    kinds = {type(r) for r in records}
    if kinds == {GenEvalRecord}:
        return [
            BenchmarkPrompt(benchmark=benchmark, key=f"{i:05d}", prompt=r.prompt, group=r.tag, record=r)
            for i, r in enumerate(records)
        ]
    if kinds == {DPGItem}:
        dups = sorted(k for k, n in Counter(r.item_id for r in records).items() if n > 1)
        if dups:
            raise MetadataError(f"{benchmark}: key 'item_id': found duplicates {_id_list(dups)}; expected unique ids")
        return [
            BenchmarkPrompt(benchmark=benchmark, key=r.item_id, prompt=r.prompt, group="dpg", record=r)
            for r in records
        ]
    names = sorted(k.__name__ for k in kinds)
    raise TypeError(f"to_benchmark_prompts: expected all GenEvalRecord or all DPGItem, got {names}")
