"""Rebuild the study table of experiments/shapes_geneval/README.md from the run logs (no training, no sampling).

    python experiments/shapes_geneval/make_table.py [--study LOG_DIR/study LOG_DIR/study_mar] [--readme PATH]

Reads (from each study folder; the MAR rows live in ``study_mar``) `<study>/<method>/seed<k>/summary.json` (GenEval at the start and end of each RL run; `val_start` is the base,
identical for every method of a seed) and `.../dpg/dpg_results.json` (ShapesWorld-DPG of the final policy;
`<study>/base/seed<k>/dpg/` for the base), averages over seeds (mean ± sample std, n seeds) and replaces the text
between the `<!-- study-table:start -->` and `<!-- study-table:end -->` markers of the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
ORDER = ["Base (warm start)", "GRPO", "UniGRPO", "MaskGRPO", "TraceRL-style", "d1", "Coupled-GRPO", "HT-GRPO",
         "MAR base (warm start)", "MAR-GRPO plain", "MAR-GRPO"]
START, END = "<!-- study-table:start -->", "<!-- study-table:end -->"
MAR_START, MAR_END = "<!-- mar-study-table:start -->", "<!-- mar-study-table:end -->"  # optional: the MAR rows
GAIN_START, GAIN_END = "<!-- study-gain:start -->", "<!-- study-gain:end -->"  # optional: gains, CIs, tests
ABLATION_START, ABLATION_END = "<!-- ablation-gain:start -->", "<!-- ablation-gain:end -->"  # optional: ablations
REFERENCE = "HT-GRPO"  # the method every other one is tested against


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# folders of the warm starts' own DPG runs (no summary.json) -> their table row
BASE_DIRS = {"base": "Base (warm start)", "MAR base": "MAR base (warm start)"}


def collect(study: Path | list[Path]) -> dict[str, dict[str, list[float]]]:
    """method -> column -> one value per seed. Columns: geneval/<task>, geneval/overall, dpg/overall, steps, seconds.

    ``study`` may be several study folders (e.g. ``logs/study`` and ``logs/study_mar``); their runs are merged."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    base_seen: set[tuple[str, str]] = set()
    studies = [study] if isinstance(study, Path) else list(study)
    for run_dir in sorted(d for s in studies for d in s.glob("*/seed*")):
        method = run_dir.parent.name.replace("_", " ")
        seed = run_dir.name
        summary = _load(run_dir / "summary.json")
        if summary is not None:
            end, start = summary.get("val_end", {}), summary.get("val_start", {})
            for key, value in end.items():
                table[method][key].append(float(value))
            table[method]["steps"].append(float(summary.get("steps", math.nan)))
            table[method]["seconds"].append(float(summary.get("seconds", math.nan)))
            base_name = "MAR base (warm start)" if method.startswith("MAR") else "Base (warm start)"
            if start and (base_name, seed) not in base_seen:  # one base value per seed
                base_seen.add((base_name, seed))
                for key, value in start.items():
                    table[base_name][key].append(float(value))
        dpg = _load(run_dir / "dpg" / "dpg_results.json")
        if dpg is not None:
            name = BASE_DIRS.get(method, method)
            table[name]["dpg/overall"].append(float(dpg["overall"]))
    return table


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(table: dict[str, dict[str, list[float]]]) -> str:
    methods = sorted(table, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    seeds = max((len(v) for cols in table.values() for v in cols.values()), default=0)
    head = ["method", *TASKS, "**overall**", "Δ overall", "DPG", "rollout steps", "s / run"]
    lines = [f"ShapesWorld-GenEval (six tasks, overall in [0,1]) and ShapesWorld-DPG (0–100); mean ± std over "
             f"seeds (up to {seeds}).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = table.get("Base (warm start)", {}).get("geneval/overall", [])
    mar_base = table.get("MAR base (warm start)", {}).get("geneval/overall", [])
    for m in methods:
        cols = table[m]
        ref = mar_base if m.startswith("MAR") else base
        overall = cols.get("geneval/overall", [])
        delta = [a - b for a, b in zip(overall, ref)] if ref and "base" not in m.lower() else []
        row = [m, *(_cell(cols.get(f"geneval/{t}", [])) for t in TASKS), f"**{_cell(overall)}**",
               _cell(delta) if delta else "–", _cell(cols.get("dpg/overall", []), digits=1),
               _cell(cols.get("steps", []), digits=0), _cell(cols.get("seconds", []), digits=0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_table(study: Path | list[Path], readme: Path) -> str:
    """Render the table from ``study`` (one folder or several, merged) and put it between the README markers;
    returns the table."""
    studies = [study] if isinstance(study, Path) else list(study)
    if not studies or not all(s.is_dir() for s in studies):
        raise SystemExit(f"{[str(s) for s in studies]}: no study runs (run experiments/shapes_geneval/run_study.py "
                         "first)")
    table = collect(studies)
    doc = readme.read_text() if readme.exists() else f"{START}\n{END}\n"
    if START not in doc or END not in doc:
        raise SystemExit(f"{readme}: missing the {START} / {END} markers")
    if MAR_START in doc and MAR_END in doc:
        # The MAR rows have their own table (their own warm start and study folder): each table is rewritten only
        # from the logs that are present, so regenerating one family never erases the other's rows.
        mar = {m: cols for m, cols in table.items() if m.startswith("MAR")}
        rest = {m: cols for m, cols in table.items() if not m.startswith("MAR")}
        texts = []
        for rows, (start, end) in ((rest, (START, END)), (mar, (MAR_START, MAR_END))):
            if rows:
                text = render(rows)
                doc = _replace_between(doc, start, end, text)
                texts.append(text)
        readme.write_text(doc)
        return "\n\n".join(texts)
    text = render(table)
    readme.write_text(_replace_between(doc, START, END, text))
    return text


def _method_runs(study: Path) -> dict[str, dict[int, Path]]:
    """method -> seed -> run folder, for the runs that kept their per-image validation results."""
    runs: dict[str, dict[int, Path]] = defaultdict(dict)
    for run_dir in sorted(study.glob("*/seed*")):
        if (run_dir / "val_start_images.jsonl").exists() and (run_dir / "val_end_images.jsonl").exists():
            runs[run_dir.parent.name.replace("_", " ")][int(run_dir.name[len("seed"):])] = run_dir
    return dict(runs)


def render_gains(study: Path, reference: str = REFERENCE, resamples: int = 10000) -> str:
    """Per method: mean gain over seeds with its 95% bootstrap interval, and the difference from ``reference``
    with its paired 95% interval and p-value (gain.py's ``bootstrap_gain`` / ``paired_difference``: prompts
    resampled within task, seeds resampled, the same draws for both methods)."""
    sys.path.insert(0, str(HERE))
    from gain import bootstrap_gain, load_run, paired_difference

    runs = _method_runs(study)
    if not runs:
        raise SystemExit(f"{study}: no runs with val_start_images.jsonl / val_end_images.jsonl")
    keys_by_task = None
    loaded: dict[str, dict[int, tuple[dict, dict]]] = {}
    for method, seeds in runs.items():
        loaded[method] = {}
        for seed, run_dir in sorted(seeds.items()):
            start, end, keys_by_task = load_run(run_dir, keys_by_task)
            loaded[method][seed] = (start, end)
    assert keys_by_task is not None
    images = sum(1 for _ in open(next(iter(next(iter(runs.values())).values())) / "val_start_images.jsonl"))
    head = ["method", "seeds", "mean gain", "95% interval", f"gain − {reference}", "95% interval", "p",
            f"differs from {reference}?"]
    lines = [f"Gain of GenEval overall over the warm start ({images} validation images per evaluation, "
             f"{sum(len(k) for k in keys_by_task.values())} prompts); intervals: {resamples} bootstrap resamples of "
             "the seeds and, within each task, of the validation prompts (paired). A difference is significant at 5% "
             "when its interval excludes 0.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = sorted(loaded, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    for method in methods:
        seeds = sorted(loaded[method])
        starts = [loaded[method][k][0] for k in seeds]
        ends = [loaded[method][k][1] for k in seeds]
        point, lo, hi = bootstrap_gain(starts, ends, keys_by_task, resamples)
        row = [method, ",".join(map(str, seeds)), f"{point:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]"]
        common = [k for k in seeds if k in loaded.get(reference, {})]
        if method == reference or not common:
            row += ["–", "–", "–", "–" if method == reference else "no common seeds"]
        else:
            diff, dlo, dhi, p_value = paired_difference(
                ([loaded[method][k][0] for k in common], [loaded[method][k][1] for k in common]),
                ([loaded[reference][k][0] for k in common], [loaded[reference][k][1] for k in common]),
                keys_by_task, resamples)
            verdict = "no" if dlo <= 0 <= dhi else ("yes, higher" if diff > 0 else "yes, lower")
            row += [f"{diff:+.3f}", f"[{dlo:+.3f}, {dhi:+.3f}]", f"{p_value:.3f}", verdict]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_gains(study: Path, readme: Path, resamples: int = 10000,
                markers: tuple[str, str] = (GAIN_START, GAIN_END)) -> str:
    """Render the gain / significance table of ``study`` and put it between the README's ``markers`` (if there;
    the ablation study uses ``ABLATION_START``/``ABLATION_END``)."""
    text = render_gains(study, resamples=resamples)
    doc = readme.read_text() if readme.exists() else ""
    start, end = markers
    if start in doc and end in doc:
        readme.write_text(_replace_between(doc, start, end, text))
    return text


def _replace_between(doc: str, start: str, end: str, text: str) -> str:
    before, rest = doc.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{text}\n{end}{after}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(os.environ.get("HTGRPO_ROOT", REPO))
    ap.add_argument("--study", type=Path, nargs="+", default=None,
                    help="study folders, merged (default: LOG_DIR/study and LOG_DIR/study_mar, those that exist)")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = ap.parse_args(argv)
    studies = args.study or [d for d in (root / "logs" / "study", root / "logs" / "study_mar") if d.is_dir()] \
        or [root / "logs" / "study"]
    print(write_table(studies, args.readme))
    llada = [d for d in studies if d.name != "study_mar"]
    if llada and _method_runs(llada[0]):
        print(write_gains(llada[0], args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
