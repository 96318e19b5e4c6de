"""``python -m htgrpo.fit experiment=NAME [key=value ...]`` — train a policy.

The recipe, top to bottom:
    1. compose the config (Hydra) and seed everything;
    2. build the world, the validation benchmark, the training prompts, the policy, the sampler and the
       algorithm's LightningModule — every config error surfaces here, naming its key;
    3. build callbacks, loggers (TensorBoard by default) and the Lightning Trainer;
    4. validate before training (``val_start``), ``trainer.fit`` (resuming from ``ckpt_path`` if set),
       validate after (``val_end``);
    5. write ``summary.json`` in the run folder and print the before/after table.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from htgrpo._hydra import apply_num_threads, config_dir, run_or_exit_on_config_error
from htgrpo.checkpoints import resume_from
from htgrpo.config import call_checked, instantiate_node
from htgrpo.rewards.base import RewardUnavailableError
from htgrpo.strategies import check_strategy_supports, check_trainer_hardware

log = logging.getLogger("htgrpo.fit")

# Lightning warnings that do not apply to these modules, silenced so the main command's output stays readable:
# the GRPO modules optimise manually and checkpoint after the whole rollout step (their state is complete then),
# and policies sample in eval mode on purpose (frozen tokenizers, no dropout in the toy LLaDA).
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks_cfg = cfg.get("callbacks") or {}
    return [instantiate_node(cfg, f"callbacks.{name}") for name, node in callbacks_cfg.items()
            if node is not None and "_target_" in node]


def build_loggers(cfg: DictConfig) -> list[Any]:
    logger_cfg = cfg.get("logger") or {}
    return [instantiate_node(cfg, f"logger.{name}") for name, node in logger_cfg.items()
            if node is not None and "_target_" in node]


def _metrics(values: dict[str, Any], prefix: str = "val/") -> dict[str, float]:
    """Strip the ``val/`` prefix and keep plain floats."""
    out = {}
    for key, value in values.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = float(value)
    return dict(sorted(out.items()))


def _table_order(key: str) -> tuple[int, str]:
    """Rows of the before/after table: the benchmark's scores first, then ``diversity/*``, then anything else."""
    if key.startswith(("geneval/", "dpg/")):
        return (0, key)
    return (1, key) if key.startswith("diversity/") else (2, key)


def format_summary_table(val_start: dict[str, float], val_end: dict[str, float]) -> str:
    """Before/after table of the validation metrics: the benchmark's scores, then the diversity / fidelity rows
    (``diversity/*``, ShapesWorld GenEval: ``htgrpo.evaluation.diversity`` says which way is better for each)."""
    keys = sorted(set(val_start) | set(val_end), key=_table_order)
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k in keys:
        a, b = val_start.get(k), val_end.get(k)
        fa = "-" if a is None else f"{a:.4f}"
        fb = "-" if b is None else f"{b:.4f}"
        fd = "-" if a is None or b is None or math.isnan(a) or math.isnan(b) else f"{b - a:+.4f}"
        lines.append(f"| {k} | {fa} | {fb} | {fd} |")
    return "\n".join(lines)


def reward_curve(history: list[float]) -> dict[str, Any]:
    """Summary of the per-step mean rollout reward: the mean of each third of the steps (the last third holds the
    remainder), the first and last step; ``{}`` with fewer than 3 steps. E.g. [1, 2, 3, 4] -> thirds [1, 2, 3.5]."""
    values = [float(v) for v in history if not math.isnan(float(v))]
    n = len(values)
    if n < 3:
        return {}
    k = n // 3
    parts = [values[:k], values[k:2 * k], values[2 * k:]]
    return {"steps": n, "thirds": [sum(p) / len(p) for p in parts], "first": values[0], "last": values[-1]}


def check_reward_before_build(cfg: DictConfig) -> bool:
    """Build the ``reward`` node alone and run its start-up check (``Reward.check_ready``) when its class says it is
    cheap to build (``cheap_to_build``: a client of a served reward). Returns whether it did."""
    from hydra.utils import get_object

    target = OmegaConf.select(cfg, "reward._target_", default=None)
    try:
        cls = get_object(str(target)) if target else None
    except Exception:  # noqa: BLE001 - a bad target fails later, naming its key, when the algorithm is built
        return False
    if not getattr(cls, "cheap_to_build", False):
        return False
    call_checked(instantiate_node(cfg, "reward").check_ready, "reward")
    return True


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the summary written to ``summary.json``."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    apply_num_threads(cfg.get("num_threads"))  # before anything is built: the run's float reductions depend on it
    L.seed_everything(int(cfg.seed), workers=True)
    # A strategy that needs CUDA (DeepSpeed, accelerator=gpu) fails here, naming `trainer`, before anything is built.
    check_trainer_hardware(OmegaConf.to_container(cfg.trainer, resolve=True))
    # ckpt_path: a training checkpoint of a kind htgrpo.checkpoints knows, else it fails here naming the key.
    resume = resume_from(cfg.get("ckpt_path"))
    if resume is not None:
        log.info("resuming from %s (%s, step %s)", resume.ckpt_path, resume.kind, resume.global_step)

    # A reward that is cheap to build (reward=remote) checks its server before the policy loads, which can take
    # minutes: a wrong URL or token stops the run in seconds. Others are checked once built, below.
    checked_early = check_reward_before_build(cfg)
    benchmark = instantiate_node(cfg, "benchmark")
    datamodule = instantiate_node(cfg, "data", val_prompts=benchmark.prompts)
    policy = instantiate_node(cfg, "policy")
    sampler = instantiate_node(cfg, "sampler")
    module = instantiate_node(cfg, "algorithm", policy=policy, benchmark=benchmark, sampler=sampler)
    reward = getattr(module, "reward_fn", None)
    if not checked_early and callable(getattr(reward, "check_ready", None)):
        call_checked(reward.check_ready, "reward")  # a served reward: a wrong URL or token stops the run here
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate_node(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    from htgrpo.policies.lora import check_precision

    check_precision(module, trainer.precision, trainer.strategy)  # AdamW on fp32 weights (LoRA adapters or masters)
    check_strategy_supports(trainer.strategy, module)              # e.g. ZeRO-3: one backward per update
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # Validation prompts are generated/read now, so a bad prompt file fails before any training.
    log.info("benchmark %s: %d prompts x %d images", benchmark.name, len(benchmark.prompts), benchmark.images_per_prompt)

    val_start: dict[str, float] = {}
    if cfg.validate_at_start and resume is None:
        val_start = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    val_start_rows = list(getattr(module, "val_rows", []))
    trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume is None else resume.ckpt_path)
    failure = getattr(module, "reward_failure", None)
    if failure:  # the reward gave nothing for reward.max_failed_batches batches: keep what was trained, then stop
        ckpt = output_dir / "checkpoints" / "reward_unavailable.ckpt"
        trainer.save_checkpoint(ckpt)
        raise RewardUnavailableError(f"{failure}. Checkpoint of the last trained state: {ckpt} (resume with "
                                     f"ckpt_path={ckpt} once the reward works again)")

    val_end: dict[str, float] = {}
    if cfg.validate_at_end:
        if getattr(module, "last_validated_step", None) == trainer.global_step:
            val_end = _metrics(dict(trainer.callback_metrics))
        else:
            val_end = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False)[0])

    summary = {"val_start": val_start, "val_end": val_end, "steps": int(getattr(module, "training_steps_done", trainer.global_step)),
               "seconds": round(time.perf_counter() - started, 2)}
    curve = reward_curve(getattr(module, "reward_history", []))
    if curve:
        summary["reward_curve"] = curve
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        # Per-image validation results (rank 0's share), e.g. for paired bootstrap intervals of the gain.
        for name, rows in (("val_start", val_start_rows if val_start else []),
                           ("val_end", getattr(module, "val_rows", []) if val_end else [])):
            if rows:
                with open(output_dir / f"{name}_images.jsonl", "w") as fh:
                    fh.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"\n{cfg.task_name}: {summary['steps']} steps in {summary['seconds']:.0f} s -> {output_dir}")
        print(format_summary_table(val_start, val_end))
        if curve:
            thirds = " -> ".join(f"{v:.3f}" for v in curve["thirds"])
            print(f"rollout reward (mean per third of {curve['steps']} steps): {thirds}; "
                  f"first step {curve['first']:.3f}, last step {curve['last']:.3f}")
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="fit")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run_or_exit_on_config_error(run, cfg, log)
    except RewardUnavailableError as err:
        log.error("reward unavailable: %s", err)
        raise SystemExit(f"Reward unavailable: {err}") from None
    overall = summary["val_end"].get("geneval/overall", summary["val_end"].get("dpg/overall"))
    return overall  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
