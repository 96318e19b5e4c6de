"""Colour collapse against GenEval gain, per setting of the main command, over seeds (issue 19, item 3).

Two steps, both without training or sampling:

1. ``--collect RUN_DIR ...`` reads each ``python -m htgrpo.fit experiment=shapes_ht ...`` run folder
   (``summary.json``, ``val_start_images.jsonl`` / ``val_end_images.jsonl``, ``.hydra/config.yaml``) and writes one
   small JSON row per run to ``--rows`` (default ``experiments/shapes_geneval/collapse/runs/<setting>_s<seed>.json``):
   the run's summary, its seed, its KL weight β (``algorithm.beta``), its config (to check that the runs of one
   setting differ only in the seed) and the per-prompt shares of correct validation images before and after (what
   the bootstrap of ``gain.py`` resamples). The setting is named from its config (:func:`setting_name`: ``plain``
   for the GenEval reward at β 0.01 and a constant rate, else e.g. ``beta0.3``, ``bonus1+cosine``) unless
   ``--name`` says otherwise.
2. The table (always): per setting, the mean GenEval gain over seeds with ``gain.py``'s 95% paired bootstrap
   interval (seeds and, within each task, validation prompts resampled), the gain against the reference setting's
   (``--reference``, default ``plain``) with ``gain.py``'s paired difference (same seeds), and ``diversity/color_divergence`` (lower is better) and
   ``diversity/per_prompt`` (higher is better) at the warm start (``val_start``) and after (``val_end``): mean over
   seeds, ratio of the means, and each seed's value. It prints the table and writes it to ``--out``.

The target (issue 19): mean gain ≥ +0.10 with the interval's lower end > 0, ``color_divergence`` ≤ 1.10 × the warm
start's and ``per_prompt`` ≥ 0.90 × the warm start's (both on the means over seeds).

    python experiments/shapes_geneval/collapse.py --collect /work/runs/i19sweep/beta0.3_s1 ...
    python experiments/shapes_geneval/collapse.py          # table from collapse/runs/*.json -> collapse/collapse.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gain import bootstrap_gain, load_run, overall, paired_difference, t_interval  # noqa: E402

DEFAULT_BETA = 0.01  # conf/experiment/shapes_ht.yaml's `beta` (unchanged by the bonus)
GAIN_TARGET = 0.10  # issue 19: GenEval gain of at least +0.10 ...
DIVERSITY_BAND = 0.10  # ... with color_divergence and per_prompt within 10% of the warm start's
COLOR_DIVERGENCE = "diversity/color_divergence"
PER_PROMPT = "diversity/per_prompt"
COLORS = "geneval/colors"  # fidelity beside the target: does the policy still paint the colour it is asked for?
STRAY = "diversity/stray_share"  # ... and clean objects (painted cells outside every detected object)
IGNORED_CONFIG_KEYS = {"seed"}  # the only key the runs of one setting may differ in


@dataclass
class RunRow:
    """One run as the table needs it (one ``collapse/runs/*.json`` file)."""

    setting: str
    seed: int
    beta: float
    val_start: dict[str, float]
    val_end: dict[str, float]
    keys_by_task: dict[str, list[str]]
    start_shares: dict[str, np.ndarray]  # task -> share of correct images per prompt (keys_by_task order)
    end_shares: dict[str, np.ndarray]
    config: dict


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (config comparison key by key)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def setting_name(config: dict) -> str:
    """A run's setting from its config: ``beta<β>`` when β is not 0.01, ``bonus<λ>`` when the diversity bonus is on
    (``_batch`` for its batch scope), ``+<schedule>`` when the rate decays; ``plain`` when none of these (the
    GenEval reward at the old main command's settings). Keys a run predates count as their defaults."""
    algo = config.get("algorithm", {})
    parts = []
    beta = float(algo.get("beta", DEFAULT_BETA))
    if beta != DEFAULT_BETA:
        parts.append(f"beta{beta:g}")
    bonus = algo.get("diversity_bonus") or {}
    if float(bonus.get("weight", 0.0)) > 0:
        parts.append(f"bonus{float(bonus['weight']):g}" + ("_batch" if bonus.get("scope", "group") == "batch" else ""))
    name = "_".join(parts) or "plain"
    schedule = algo.get("lr_schedule", "constant")
    return name + ("" if schedule == "constant" else f"+{schedule}")


def collect_run(run_dir: Path, setting: str | None) -> dict:
    """The JSON row of one fit run folder (see the module docstring)."""
    import yaml

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise SystemExit(f"{run_dir}: no summary.json (the run has not finished); run the fit command to its end first")
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    beta = float(config["algorithm"]["beta"])
    start, end, keys_by_task = load_run(run_dir)
    return {
        "setting": setting or setting_name(config),
        "seed": int(config["seed"]),
        "beta": beta,
        "run_dir": str(run_dir),
        "summary": json.loads(summary_path.read_text()),
        "keys_by_task": keys_by_task,
        "start_shares": {t: v.tolist() for t, v in start.items()},
        "end_shares": {t: v.tolist() for t, v in end.items()},
        "config": config,
    }


def row_file_name(method: str, seed: int) -> str:
    return f"{method.replace(' ', '_')}_s{seed}.json"


def collect_rows(study: Path, rows_dir: Path, extra: Callable[[Path], dict] | None = None) -> list[Path]:
    """Write one row file (:func:`collect_run`, plus ``extra(run_dir)``'s keys) per finished run under ``study``
    (``<method>/seed<k>/summary.json``; the method is the folder name with ``_`` read as a space) into ``rows_dir``."""
    rows_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run_dir in sorted(study.glob("*/seed*")):
        if not (run_dir / "summary.json").exists():
            continue
        method = run_dir.parent.name.replace("_", " ")
        row = collect_run(run_dir, setting=method)
        if extra is not None:
            row.update(extra(run_dir))
        path = rows_dir / row_file_name(method, int(row["seed"]))
        path.write_text(json.dumps(row, indent=1) + "\n")
        written.append(path)
    return written


def run_gain(row: RunRow) -> float:
    """GenEval overall after minus before, from the row's per-prompt shares of correct images."""
    ones = {t: np.ones(len(k)) for t, k in row.keys_by_task.items()}
    return overall(row.end_shares, ones) - overall(row.start_shares, ones)


def load_row(path: Path) -> RunRow:
    row = json.loads(path.read_text())
    return RunRow(setting=row["setting"], seed=int(row["seed"]), beta=float(row["beta"]),
                  val_start=row["summary"]["val_start"], val_end=row["summary"]["val_end"],
                  keys_by_task=row["keys_by_task"],
                  start_shares={t: np.asarray(v, dtype=float) for t, v in row["start_shares"].items()},
                  end_shares={t: np.asarray(v, dtype=float) for t, v in row["end_shares"].items()},
                  config=row["config"])


def inert(key: str, config: dict[str, object]) -> bool:
    """Whether a (flattened) config key has no effect in this run, so a difference in it does not split a setting:
    the decay keys under a constant rate, the bonus's details when its weight is 0."""
    if key in ("algorithm.lr_min_ratio", "algorithm.lr_decay_batches"):
        return config.get("algorithm.lr_schedule", "constant") == "constant"
    if key.startswith("algorithm.diversity_bonus.") and key != "algorithm.diversity_bonus.weight":
        return float(config.get("algorithm.diversity_bonus.weight", 0.0) or 0.0) == 0.0
    return False


def check_same_setting(runs: list[RunRow]) -> None:
    """The runs of one setting must differ only in the seed (keys present in both configs are compared: runs made
    before a new config key existed lack it, and a new key's default keeps the old behaviour)."""
    first = _flatten(runs[0].config)
    for run in runs[1:]:
        other = _flatten(run.config)
        for key in sorted(set(first) & set(other) - IGNORED_CONFIG_KEYS):
            if first[key] != other[key] and not key.startswith("hydra") and not (inert(key, first) and inert(key, other)):
                raise SystemExit(f"setting {runs[0].setting}: seeds {runs[0].seed} and {run.seed} differ in config key "
                                 f"{key!r} ({first[key]!r} vs {other[key]!r}); collect them under different --name")
        seeds = [r.seed for r in runs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"setting {runs[0].setting}: seed listed twice ({seeds}); remove one row file")


def seed_interval(values: list[float], digits: int) -> str:
    """``mean [lo, hi]``: the mean of per-seed values with its 95% t-interval (Student's t, n − 1 degrees of
    freedom); the mean alone for one value, ``–`` for none."""
    if not values:
        return "–"
    mean, half = t_interval(values)
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"


def ratio(after: float, before: float) -> float:
    """``after / before`` (NaN when ``before`` is 0 or either is NaN)."""
    return after / before if before and not (math.isnan(after) or math.isnan(before)) else math.nan


def meets_target(gain_mean: float, gain_lo: float, divergence_ratio: float, per_prompt_ratio: float) -> bool:
    """Issue 19's target: gain ≥ +0.10, its interval's lower end > 0, ``color_divergence`` ≤ (1 + 10%) × and
    ``per_prompt`` ≥ (1 − 10%) × the warm start's."""
    return (gain_mean >= GAIN_TARGET and gain_lo > 0.0 and divergence_ratio <= 1.0 + DIVERSITY_BAND
            and per_prompt_ratio >= 1.0 - DIVERSITY_BAND)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


DEFAULT_TITLE = "HT-GRPO main command (`experiment=shapes_ht`, 40 rollout steps) by setting"


def table(rows: list[RunRow], resamples: int, reference: str = "plain",
          title: str = DEFAULT_TITLE) -> str:
    """The markdown table (see the module docstring); ``reference`` names the setting every other one is compared
    with (paired, same seeds)."""
    by_setting: dict[str, list[RunRow]] = defaultdict(list)
    for row in rows:
        by_setting[row.setting].append(row)
    for runs in by_setting.values():
        runs.sort(key=lambda r: r.seed)
        check_same_setting(runs)
    settings = sorted(by_setting, key=lambda s: (s != reference, by_setting[s][0].beta, s))
    keys_by_task = rows[0].keys_by_task
    if any(r.keys_by_task != keys_by_task for r in rows):
        raise SystemExit("the runs were validated on different prompts; their gains cannot be pooled")
    default = reference if reference in by_setting else None
    ones = {t: np.ones(len(k)) for t, k in keys_by_task.items()}

    lines = [
        f"| setting (β) | seeds | GenEval gain, mean [95% CI] | gain − {reference}'s [95% CI] | color_divergence start → end "
        "(ratio; per seed end) | per_prompt start → end (ratio; per seed end) | colors end | stray_share end | "
        "target met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per_seed = ["| setting (β) | seed | GenEval start → end (gain) | color_divergence start → end | "
                "per_prompt start → end |", "|---|---|---|---|---|"]
    for setting in settings:
        runs = by_setting[setting]
        starts, ends = [r.start_shares for r in runs], [r.end_shares for r in runs]
        point, lo, hi = bootstrap_gain(starts, ends, keys_by_task, resamples)
        versus = "–"
        if default is not None and setting != default:
            base = {r.seed: r for r in by_setting[default]}
            common = [r for r in runs if r.seed in base]
            if common:
                d, dlo, dhi, _ = paired_difference(
                    ([r.start_shares for r in common], [r.end_shares for r in common]),
                    ([base[r.seed].start_shares for r in common], [base[r.seed].end_shares for r in common]),
                    keys_by_task, resamples)
                versus = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] (seeds {', '.join(str(r.seed) for r in common)})"
        cells = []
        ratios = []
        for key in (COLOR_DIVERGENCE, PER_PROMPT):
            before = _mean([r.val_start.get(key, math.nan) for r in runs])
            after = _mean([r.val_end.get(key, math.nan) for r in runs])
            ratios.append(ratio(after, before))
            digits = 4 if key == COLOR_DIVERGENCE else 3  # divergences near the warm start's are ~0.02
            each = " / ".join(f"{r.val_end.get(key, math.nan):.{digits}f}" for r in runs)
            cells.append(f"{before:.4f} → {after:.4f} ({ratios[-1]:.2f}; {each})")
        fidelity = []
        for key in (COLORS, STRAY):  # stray_share: only runs made after it was added have it
            values = [r.val_end[key] for r in runs if key in r.val_end]
            partial = "" if len(values) == len(runs) else f" ({len(values)} of {len(runs)})"
            fidelity.append(f"{_mean(values):.3f}{partial}" if values else "–")
        met = meets_target(point, lo, ratios[0], ratios[1])
        verdict = ("yes" if met else "no") + ("" if len(runs) >= 3 else f" ({len(runs)} seed{'s' * (len(runs) > 1)})")
        beta = runs[0].beta
        name = f"{setting} ({beta:g}{', reference' if setting == default else ''})"
        lines.append(f"| {name} | {', '.join(str(r.seed) for r in runs)} | {point:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                     f"{versus} | {cells[0]} | {cells[1]} | {fidelity[0]} | {fidelity[1]} | {verdict} |")
        for r in runs:
            s, e = overall(r.start_shares, ones), overall(r.end_shares, ones)
            per_seed.append(f"| {name} | {r.seed} | {s:.3f} → {e:.3f} ({e - s:+.3f}) | "
                            f"{r.val_start[COLOR_DIVERGENCE]:.4f} → {r.val_end[COLOR_DIVERGENCE]:.4f} | "
                            f"{r.val_start[PER_PROMPT]:.3f} → {r.val_end[PER_PROMPT]:.3f} |")
    spread = ["| setting (β) | seeds | color_divergence end [95% CI] | per_prompt end [95% CI] | colors end [95% CI] "
              "| stray_share end [95% CI] |", "|---|---|---|---|---|---|"]
    for setting in settings:
        runs = by_setting[setting]
        cells = [seed_interval([r.val_end[key] for r in runs if key in r.val_end], digits)
                 for key, digits in ((COLOR_DIVERGENCE, 4), (PER_PROMPT, 3), (COLORS, 3), (STRAY, 3))]
        spread.append(f"| {setting} ({runs[0].beta:g}) | {len(runs)} | " + " | ".join(cells) + " |")
    n_prompts = sum(len(k) for k in keys_by_task.values())
    return "\n".join([
        f"{title}; ShapesWorld-GenEval "
        f"validation, {n_prompts} prompts. Gain interval: {resamples} paired bootstrap resamples of the seeds and, "
        f"within each task, of the prompts (`gain.py`). Target: gain ≥ +{GAIN_TARGET:.2f} with the interval above 0, "
        f"color_divergence ≤ {1 + DIVERSITY_BAND:.2f}× and per_prompt ≥ {1 - DIVERSITY_BAND:.2f}× the warm start's "
        f"(ratios of the means over seeds).",
        "",
        *lines,
        "",
        "Collapse and fidelity after training, mean over seeds with a 95% t-interval over the seeds (the seed-to-seed "
        "spread; one evaluation of 504 images per run; none for one seed):",
        "",
        *spread,
        "",
        *per_seed,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", type=Path, nargs="*", default=[], help="fit run folders to add as rows")
    parser.add_argument("--name", default=None, help="setting name of the collected runs (default: from the config)")
    parser.add_argument("--rows", type=Path, default=HERE / "collapse" / "runs")
    parser.add_argument("--out", type=Path, default=HERE / "collapse" / "collapse.md")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--reference", default="plain",
                        help="setting the others are compared with (paired, same seeds); default the plain reward")
    parser.add_argument("--title", default=DEFAULT_TITLE, help="first words of the table's caption")
    args = parser.parse_args()

    args.rows.mkdir(parents=True, exist_ok=True)
    for run_dir in args.collect:
        row = collect_run(run_dir, args.name)
        path = args.rows / f"{row['setting']}_s{row['seed']}.json"
        path.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{run_dir} -> {path}")
    paths = sorted(args.rows.glob("*.json"))
    if not paths:
        raise SystemExit(f"{args.rows}: no run rows; add some with --collect RUN_DIR")
    text = table([load_row(p) for p in paths], args.resamples, args.reference, args.title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
