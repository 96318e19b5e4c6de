"""ShapesWorld study: the warm-started base vs each RL method, at the same compute budget, over several seeds.

Each method is one experiment config run with the same rollout budget (`--steps` rollout batches of the same
prompts x generations, the same K inner updates, the same sampler), then its final policy is scored on
ShapesWorld-DPG too. The base is the warm start itself: its GenEval score is every run's `val_start` (same
benchmark, sampler and seed), its DPG score comes from `htgrpo.evaluate` on the export.

    python -m htgrpo.fit experiment=shapes_pretrain            # once: the warm start every method starts from
    python experiments/shapes_geneval/run_study.py --seeds 0 1 # runs what is missing, then writes the table
    python experiments/shapes_geneval/make_table.py            # rebuild the table from the run logs only

Runs go to `<log_dir>/study/<method>/seed<k>/` (`--study-name study_mar` for the MAR rows) (a `fit` run dir: summary.json, tensorboard/, checkpoints/) with
`dpg/dpg_results.json` next to it. A run whose summary.json exists is not run again (delete it to redo); extra
Hydra overrides after `--` apply to every run, e.g. `-- sampler.num_steps=8`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

METHODS = {
    # method name in the table -> experiment config
    "GRPO": "shapes_grpo",
    "UniGRPO": "shapes_unigrpo",
    "MaskGRPO": "shapes_maskgrpo",
    "TraceRL-style": "shapes_trace",
    "HT-GRPO": "shapes_ht",
}
OPTIONAL_METHODS = {"d1": "shapes_d1", "Coupled-GRPO": "shapes_coupled"}
# Which part of HT-GRPO matters (issue 21): the ablation rows, each tested against "HT-GRPO" (the full method) with a
# paired interval. Run them into their own study folder (size the seeds and validation images with power.py first):
#   run_study.py --study-name ablation --methods ABLATIONS --seeds ... --skip-dpg -- benchmark.images_per_prompt=...
ABLATION_METHODS = {
    "HT-GRPO no stages": "shapes_ht_nostages",             # one global stage over all tokens (credit on S kept)
    "HT-GRPO random-mask estimator": "shapes_ht_randmask",  # UniGRPO's random-mask log-probs, stages and credit kept
    "HT-GRPO alpha 0": "shapes_ht_alpha0",                  # no extra credit on S (stages kept)
    "HT-GRPO alpha 2": "shapes_ht_alpha2",
    "HT-GRPO alpha 0 phi 0.1": "shapes_ht_alpha0_phi01",    # the credit sweep's best cell
}
#: the whole ablation table: the full method, its ablations and the two baselines it is compared with
ABLATIONS = ["HT-GRPO", *ABLATION_METHODS, "MaskGRPO", "GRPO"]
# The toy MAR family (its own warm start, experiment=shapes_mar_pretrain); run them into their own study folder:
#   run_study.py --study-name study_mar --methods "MAR-GRPO" "MAR-GRPO plain"
MAR_METHODS = {"MAR-GRPO": "shapes_mar_grpo", "MAR-GRPO plain": "shapes_mar_grpo_plain"}
# DPG evaluation: the policy config that rebuilds a method's checkpoint, and the base (warm start) policy.
POLICIES = {"llada": ("shapes_llada", "shapes_llada_warm"), "mar": ("shapes_mar", "shapes_mar_warm")}


def family(method: str) -> str:
    """``mar`` for the MAR methods, else ``llada``."""
    return "mar" if method in MAR_METHODS else "llada"


def default_log_dir() -> Path:
    root = Path(os.environ.get("HTGRPO_ROOT", REPO))
    return root / "logs"


def run(cmd: list[str], log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(f"  -> exit {proc.returncode} in {time.perf_counter() - started:.0f} s (log: {log_file})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n--- last lines of {log_file} ---\n"
                         + "\n".join(log_file.read_text().splitlines()[-25:]))


def dpg_sampler(fam: str) -> list[str]:
    """``htgrpo.evaluate`` overrides that sample a family's policy as its experiments do (evaluate's default sampler
    is the LLaDA one): the MAR experiments' sampler settings come from conf/experiment/shapes_mar_grpo.yaml."""
    if fam != "mar":
        return []
    from omegaconf import OmegaConf

    exp = OmegaConf.load(REPO / "conf" / "experiment" / "shapes_mar_grpo.yaml")
    settings = OmegaConf.to_container(exp.get("sampler", {}) or {})
    return ["sampler=mar", *(f"sampler.{k}={v}" for k, v in settings.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help=f"table names among {list(METHODS) + list(OPTIONAL_METHODS) + list(ABLATION_METHODS)}; "
                         "ABLATIONS = the ablation table's rows")
    ap.add_argument("--steps", type=int, default=None,
                    help="rollout batches per run (default: the experiments' trainer.limit_train_batches)")
    ap.add_argument("--log-dir", type=Path, default=default_log_dir(), help="runs go to LOG_DIR/STUDY_NAME/")
    ap.add_argument("--study-name", default="study",
                    help="folder under LOG_DIR for these runs (the MAR rows: study_mar); the table merges "
                         "LOG_DIR/study and LOG_DIR/study_mar")
    ap.add_argument("--skip-dpg", action="store_true", help="do not score the final policies on ShapesWorld-DPG")
    ap.add_argument("--dpg-prompts", type=int, default=64, help="ShapesWorld-DPG prompts scored per policy")
    ap.add_argument("--dpg-images", type=int, default=4, help="images per DPG prompt")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = ap.parse_args(argv)
    if args.methods == ["ABLATIONS"]:
        args.methods = list(ABLATIONS)
    known = {**METHODS, **OPTIONAL_METHODS, **MAR_METHODS, **ABLATION_METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(known)}")

    study = args.log_dir / args.study_name
    common = list(args.overrides)
    if args.steps is not None:
        common.append(f"trainer.limit_train_batches={args.steps}")
    python = sys.executable
    dpg = ["benchmark=shapes_dpg", f"benchmark.prompts.num_prompts={args.dpg_prompts}",
           f"benchmark.images_per_prompt={args.dpg_images}"]
    for seed in args.seeds:
        for fam in sorted({family(m) for m in args.methods}):
            base_dpg = study / ("MAR_base" if fam == "mar" else "base") / f"seed{seed}" / "dpg"
            if not args.skip_dpg and not (base_dpg / "dpg_results.json").exists():
                run([python, "-m", "htgrpo.evaluate", *dpg, f"policy={POLICIES[fam][1]}", *dpg_sampler(fam),
                     f"seed={seed}", f"hydra.run.dir={base_dpg}", *[o for o in common if o.startswith("sampler.")]],
                    base_dpg / "evaluate.log")
        for method in args.methods:
            run_dir = study / method.replace(" ", "_") / f"seed{seed}"
            if not (run_dir / "summary.json").exists():
                run([python, "-m", "htgrpo.fit", f"experiment={known[method]}", f"seed={seed}",
                     f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", *common], run_dir / "fit.stdout")
            dpg_dir = run_dir / "dpg"
            if not args.skip_dpg and not (dpg_dir / "dpg_results.json").exists():
                run([python, "-m", "htgrpo.evaluate", *dpg, f"policy={POLICIES[family(method)][0]}",
                     *dpg_sampler(family(method)),
                     f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"seed={seed}", f"hydra.run.dir={dpg_dir}",
                     *[o for o in common if o.startswith(("sampler.", "policy."))]], dpg_dir / "evaluate.log")

    sys.path.insert(0, str(HERE))
    # the ablation runs have their own table (their HT-GRPO seeds must not merge into the main study's row): rows
    # committed under ablation/runs/, paired by seed
    if args.study_name == "ablation":
        from ablation_table import main as ablation_table

        ablation_table(["--collect", "--study", str(study)])
        return 0
    from make_table import write_table

    studies = [args.log_dir / name for name in dict.fromkeys(["study", "study_mar", args.study_name])]
    print(write_table([d for d in studies if d.is_dir()], HERE / "README.md"))
    if any(family(m) == "llada" for m in args.methods):
        from make_table import write_gains

        print(write_gains(args.log_dir / "study", HERE / "README.md"))  # gains, intervals, tests against HT-GRPO
    if any(family(m) == "mar" for m in args.methods):
        from stability import main as stability_table

        stability_table(["--collect", "--study", str(study)])  # rows committed under study_mar/runs/, all MAR rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
