"""Structure-influence probe: how much of the reward variance does HT-GRPO's structure set S explain?

    python experiments/diagnostics/structure_influence.py policy=shapes_llada_warm            # the toy's warm start
    python experiments/diagnostics/structure_influence.py policy=shapes_llada ckpt_path=RUN/checkpoints/last.ckpt
    python experiments/diagnostics/structure_influence.py probe.prompts_per_task=8 probe.rollouts=8 probe.resamples=8

For every probed benchmark prompt (``probe.prompts_per_task`` per task) the configured policy and sampler draw
``probe.rollouts`` images; each is split by HT-GRPO's partition (``probe.partition``: the earliest-committed
fraction φ is S, the rest R). Then, per rollout:

1. **S fixed**: R is resampled ``probe.resamples`` times given S (S visible to the model from the first step);
2. **R fixed** (``probe.resample_structure``): S is resampled given R;
3. **random set fixed** (``probe.random_control``): the control for 1, a uniformly random set of |S| positions is
   held and the rest resampled: S matters beyond its size only if it explains more than this set;
4. **token influence** (``probe.token_influence``): each token is resampled alone, the rest fixed.

Every image is scored (``probe.score``: the benchmark's verdict, or the configured ``reward``). Per task the probe
reports the share of the reward variance S explains (``Var(E[f|S]) / Var(f)``, a one-way random-effects ANOVA of
experiment 1), the share R explains (2), the share a random set of the same size explains (3), and the share
of single-token influence that falls in S against its chance level ``|S|/N``; 95% intervals bootstrap the prompts.
The maths is in :mod:`htgrpo.evaluation.structure_influence`. Written to the run folder (``hydra.run.dir``):
``structure_influence.json`` (settings, per-prompt tables, summary), ``structure_influence.md`` (the table) and
``structure_influence.png`` (the plot).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from htgrpo._hydra import config_dir, run_or_exit_on_config_error  # noqa: E402
from htgrpo.algorithms.credit import ENTROPY_ORDERS, PARTITION_KEYS, structure_mask, validate_fraction  # noqa: E402
from htgrpo.config import ConfigError, call_checked, instantiate_node, require, require_choice  # noqa: E402
from htgrpo.evaluation.structure_influence import (  # noqa: E402
    VarianceComponents,
    bootstrap_ratio,
    bootstrap_share,
    clamped_logits_fn,
    influence_share,
    one_way_components,
    pooled_share,
    resample_single_tokens,
)
from htgrpo.policies.sampling import SampledImageTokens  # noqa: E402
from htgrpo.policies.t2i_layout import MASKED  # noqa: E402

log = logging.getLogger("structure_influence")

SCORES = ("verdict", "reward")


# ---------------------------------------------------------------------------------------------------------------
# settings and results
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSettings:
    """The ``probe`` config section, checked (a bad value names its ``probe.*`` key)."""

    prompts_per_task: int
    rollouts: int
    resamples: int
    score: str
    partition_key: str
    fraction: float
    entropy_order: str
    resample_structure: bool
    random_control: bool
    token_influence: bool
    batch_size: int
    bootstrap: int

    @staticmethod
    def from_config(node: Any) -> ProbeSettings:
        part = node.get("partition", {}) or {}
        for key, low in (("prompts_per_task", 1), ("rollouts", 2), ("resamples", 2), ("batch_size", 1),
                         ("bootstrap", 1)):
            value = node.get(key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"probe.{key}",
                    f"must be an integer >= {low}, got {value!r}")
        require_choice(node.get("score"), SCORES, "probe.score")
        require_choice(part.get("key"), PARTITION_KEYS, "probe.partition.key")
        require_choice(part.get("entropy_order", "ascending"), ENTROPY_ORDERS, "probe.partition.entropy_order")
        try:
            fraction = validate_fraction(part.get("fraction"), "probe.partition.fraction")
        except ValueError as err:
            raise ConfigError("probe.partition.fraction", str(err)) from None
        return ProbeSettings(int(node.prompts_per_task), int(node.rollouts), int(node.resamples), str(node.score),
                             str(part.get("key")), fraction, str(part.get("entropy_order", "ascending")),
                             bool(node.get("resample_structure", True)), bool(node.get("random_control", True)),
                             bool(node.get("token_influence", True)),
                             int(node.batch_size), int(node.bootstrap))


@dataclass
class PromptProbe:
    """Everything measured on one prompt (``n`` rollouts, ``M`` resamples, ``N`` image tokens)."""

    task: str
    key: str
    prompt: str
    rollout_scores: np.ndarray            # (n,) score of each rollout
    structure_fixed: np.ndarray           # (n, M) scores with S held, R resampled
    refine_fixed: np.ndarray | None       # (n, M) scores with R held, S resampled
    random_fixed: np.ndarray | None       # (n, M) scores with a random set of |S| positions held, the rest resampled
    influence: np.ndarray | None          # (n, N) |score change| when token j alone is resampled
    structure: np.ndarray                 # (n, N) bool, S of each rollout

    def to_json(self) -> dict[str, Any]:
        out = {"task": self.task, "key": self.key, "prompt": self.prompt,
               "rollout_scores": self.rollout_scores.tolist(), "structure_fixed": self.structure_fixed.tolist(),
               "structure_size": self.structure.sum(1).tolist()}
        if self.refine_fixed is not None:
            out["refine_fixed"] = self.refine_fixed.tolist()
        if self.random_fixed is not None:
            out["random_fixed"] = self.random_fixed.tolist()
        if self.influence is not None:
            out["influence_in_structure"] = (self.influence * self.structure).sum(1).tolist()
            out["influence_total"] = self.influence.sum(1).tolist()
        return out


# ---------------------------------------------------------------------------------------------------------------
# sampling and scoring
# ---------------------------------------------------------------------------------------------------------------
class Prober:
    """Draws rollouts and conditional resamples with a policy and its sampler, and scores them."""

    def __init__(self, policy: Any, sampler: Any, benchmark: Any, reward: Any, settings: ProbeSettings,
                 generator: torch.Generator):
        self.policy, self.sampler, self.benchmark, self.reward = policy, sampler, benchmark, reward
        self.settings = settings
        self.generator = generator

    def score(self, images: torch.Tensor, prompt: Any) -> np.ndarray:
        """Scores of ``images`` (all for ``prompt``): the benchmark's verdict or the configured reward."""
        records = [prompt.record] * images.shape[0]
        if self.settings.score == "reward":
            from htgrpo.rewards.base import safe_score

            return safe_score(self.reward, images, records).scores.double().numpy()
        results = self.benchmark.scorer.score(images, records)
        if self.benchmark.kind == "geneval":
            return np.array([float(r.correct) for r in results])
        return np.array([float(r.score) for r in results])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.policy.image_tokenizer.decode(codes.cpu())

    def rollouts(self, prompt_tokens: Any) -> SampledImageTokens:
        """The configured sampler on the ``(n,)`` prompt rows, in chunks of ``probe.batch_size``."""
        parts, size = [], self.settings.batch_size
        for i in range(0, prompt_tokens.batch_size, size):
            parts.append(self.sampler.sample(self.policy, prompt_tokens[i:i + size], generator=self.generator))
        return SampledImageTokens.concat(parts)

    def conditional(self, prompt_tokens: Any, codes: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Codes drawn by the configured sampler with the ``fixed`` positions held at ``codes`` (rows: canvases)."""
        out, size = [], self.settings.batch_size
        for i in range(0, codes.shape[0], size):
            rows = slice(i, i + size)
            fn = clamped_logits_fn(self.policy, prompt_tokens[rows], codes[rows], fixed[rows])
            canvas = torch.full(codes[rows].shape, MASKED, dtype=torch.long, device=self.policy.device)
            sampled = self.sampler.sample(fn, canvas, generator=self.generator)
            out.append(sampled.codes)
        drawn = torch.cat(out)
        held = fixed.to(drawn.device)
        if not bool((drawn[held] == codes.to(drawn.device)[held]).all()):  # the clamp is what the probe relies on
            raise RuntimeError("a held token changed in conditional sampling: the sampler did not follow the clamp")
        return drawn

    def token_influence(self, prompt_token_row: Any, codes: torch.Tensor, base_score: float, prompt: Any) -> np.ndarray:
        """``(N,)`` |score change| when each token alone is resampled (0 where the draw repeats the code)."""
        guidance = float(self.sampler.guidance_scale)
        temperature = float(self.sampler.temperature)
        variants = resample_single_tokens(self.policy, prompt_token_row, codes, guidance, temperature, self.generator)
        n = codes.shape[0]
        changed = (variants != codes.to(variants.device)[None]).any(1).cpu()
        influence = np.zeros(n)
        idx = torch.nonzero(changed).flatten()
        for i in range(0, len(idx), self.settings.batch_size):
            chunk = idx[i:i + self.settings.batch_size]
            scores = self.score(self.decode(variants[chunk.to(variants.device)]), prompt)
            influence[chunk.numpy()] = np.abs(scores - base_score)
        return influence

    def probe_prompt(self, prompt: Any) -> PromptProbe:
        s = self.settings
        n, m = s.rollouts, s.resamples
        tokens = self.policy.encode_prompts([prompt.prompt]).to(self.policy.device)
        rows = tokens[[0] * n]
        sampled = self.rollouts(rows)
        codes = sampled.codes
        base = self.score(self.decode(codes), prompt)
        structure = structure_mask(sampled.commit_step, sampled.entropy, sampled.confidence, key=s.partition_key,
                                   fraction=s.fraction, entropy_order=s.entropy_order)
        # n x M canvases, rollout-major: row i*M + j is resample j of rollout i
        rep_codes = codes.repeat_interleave(m, 0)
        rep_structure = structure.repeat_interleave(m, 0)
        rep_tokens = tokens[[0] * (n * m)]
        drawn = self.conditional(rep_tokens, rep_codes, rep_structure)
        structure_fixed = self.score(self.decode(drawn), prompt).reshape(n, m)
        refine_fixed = None
        if s.resample_structure:
            drawn = self.conditional(rep_tokens, rep_codes, ~rep_structure)
            refine_fixed = self.score(self.decode(drawn), prompt).reshape(n, m)
        random_fixed = None
        if s.random_control:  # per rollout, |S| positions drawn uniformly: the k smallest of iid uniforms
            u = torch.rand(structure.shape, generator=self.generator, device=self.generator.device)
            rank = u.argsort(1).argsort(1).to(structure.device)
            random_set = rank < structure.sum(1, keepdim=True)
            drawn = self.conditional(rep_tokens, rep_codes, random_set.repeat_interleave(m, 0))
            random_fixed = self.score(self.decode(drawn), prompt).reshape(n, m)
        influence = None
        if s.token_influence:
            influence = np.stack([self.token_influence(tokens, codes[i], float(base[i]), prompt) for i in range(n)])
        return PromptProbe(prompt.group, str(prompt.key), prompt.prompt, base, structure_fixed, refine_fixed,
                           random_fixed, influence, structure.cpu().numpy())


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------
def summarise(probes: list[PromptProbe], bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """One row per task (in first-seen order) and an ``all`` row: variance shares of S and R with 95% intervals,
    and the share of single-token influence in S against its chance level."""
    tasks = list(dict.fromkeys(p.task for p in probes))
    rows = []
    for task in tasks + ["all"]:
        chosen = [p for p in probes if task == "all" or p.task == task]
        row: dict[str, Any] = {"task": task, "prompts": len(chosen),
                               "mean_score": float(np.mean([p.rollout_scores.mean() for p in chosen])),
                               "rollout_variance": float(np.mean([p.rollout_scores.var(ddof=1) for p in chosen]))}
        for name, attr in (("S", "structure_fixed"), ("R", "refine_fixed"), ("random", "random_fixed")):
            tables = [getattr(p, attr) for p in chosen]
            if any(t is None for t in tables):
                continue
            comps: list[VarianceComponents] = [one_way_components(t) for t in tables]
            lo, hi = bootstrap_share(comps, bootstrap, seed)
            row[f"share_{name}"] = pooled_share(comps)
            row[f"share_{name}_ci"] = [lo, hi]
            row[f"variance_{name}_experiment"] = float(np.mean([c.total for c in comps]))
        if "share_S" in row and "share_R" in row:
            row["share_rest"] = 1.0 - row["share_S"] - row["share_R"]
        if all(p.influence is not None for p in chosen):
            share, chance = influence_share(np.concatenate([p.influence for p in chosen]),
                                            np.concatenate([p.structure for p in chosen]))
            num = np.array([float((p.influence * p.structure).sum()) for p in chosen])
            den = np.array([float(p.influence.sum()) for p in chosen])
            row["influence_share_S"] = share
            row["influence_share_S_ci"] = list(bootstrap_ratio(num, den, bootstrap, seed))
            row["influence_chance"] = chance
            row["tokens_changing_score"] = float(np.mean([(p.influence > 0).mean() for p in chosen]))
        rows.append(row)
    return rows


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    text = f"{value:.2f}"
    if ci is not None and all(np.isfinite(ci)):
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = ["| task | prompts | mean score | Var(f) of rollouts | share S: Var(E[f|S])/Var(f) "
             "| share of a random set of S's size | share R | 1 − share S − share R "
             "| influence in S | chance (S tokens / N) | tokens that change f |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['prompts']} | {r['mean_score']:.3f} | {r['rollout_variance']:.3f} "
            f"| {_fmt(r.get('share_S'), r.get('share_S_ci'))} "
            f"| {_fmt(r.get('share_random'), r.get('share_random_ci'))} "
            f"| {_fmt(r.get('share_R'), r.get('share_R_ci'))} "
            f"| {_fmt(r.get('share_rest'))} | {_fmt(r.get('influence_share_S'), r.get('influence_share_S_ci'))} "
            f"| {_fmt(r.get('influence_chance'))} | {_fmt(r.get('tokens_changing_score'))} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bars per task: share of variance explained by S and by R (95% intervals), influence share in S vs chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["task"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.27
    for offset, (key, label) in zip((-width, 0.0, width), (("share_S", "S held: Var(E[f|S])/Var(f)"),
                                                           ("share_random", "random |S| positions held"),
                                                           ("share_R", "R held: Var(E[f|R])/Var(f)"))):
        vals = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        ci = np.array([r.get(f"{key}_ci", [np.nan, np.nan]) for r in rows], dtype=float)
        err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))
        axes[0].bar(x + offset, np.nan_to_num(vals), width, yerr=np.nan_to_num(err), capsize=3, label=label)
    axes[0].set_xticks(x, names, rotation=30, ha="right")
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("share of reward variance")
    axes[0].legend(fontsize=8)
    vals = np.array([r.get("influence_share_S", np.nan) for r in rows], dtype=float)
    ci = np.array([r.get("influence_share_S_ci", [np.nan, np.nan]) for r in rows], dtype=float)
    err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))
    axes[1].bar(x, np.nan_to_num(vals), 0.6, yerr=np.nan_to_num(err), capsize=3, label="influence share in S")
    chance = [r.get("influence_chance", np.nan) for r in rows]
    axes[1].scatter(x, chance, color="k", marker="_", s=400, label="chance |S|/N", zorder=3)
    axes[1].set_xticks(x, names, rotation=30, ha="right")
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("share of single-token influence")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------
def pick_prompts(prompts: list[Any], per_task: int, seed: int) -> list[Any]:
    """``per_task`` prompts of each task (group), the first ones of a shuffle seeded by ``seed``; task order kept."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    chosen: dict[str, list[Any]] = {}
    for i in order:
        p = prompts[int(i)]
        bucket = chosen.setdefault(p.group, [])
        if len(bucket) < per_task:
            bucket.append(p)
    tasks = list(dict.fromkeys(p.group for p in prompts))
    return [p for t in tasks for p in chosen.get(t, [])]


def run(cfg: DictConfig) -> dict[str, Any]:
    from htgrpo.evaluate import load_policy
    from htgrpo.policies.generators import SamplerSettings

    started = time.perf_counter()
    settings = ProbeSettings.from_config(cfg.probe)
    output_dir = Path(cfg.paths.output_dir)
    benchmark = instantiate_node(cfg, "benchmark")
    call_checked(benchmark.prepare, "benchmark.scorer")
    sampler = instantiate_node(cfg, "sampler")
    if not isinstance(sampler, SamplerSettings):
        raise ConfigError("sampler", "the probe needs a masked-diffusion sampler (maskgit | emerge)")
    reward = instantiate_node(cfg, "reward") if settings.score == "reward" else None
    policy = load_policy(cfg)
    if not hasattr(policy, "guided_image_logits"):
        raise ConfigError("policy", "the probe needs a LLaDA-architecture masked-diffusion policy (shapes_llada, "
                                    "mmada, dimoo); got " + type(policy).__name__)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    policy = policy.to(device).eval()
    generator = torch.Generator(device=policy.device).manual_seed(int(cfg.seed))
    prober = Prober(policy, sampler, benchmark, reward, settings, generator)
    prompts = pick_prompts(list(benchmark.prompts.prompts), settings.prompts_per_task, int(cfg.seed))

    from rich.progress import track

    probes = [prober.probe_prompt(p) for p in track(prompts, description="probing prompts")]
    rows = summarise(probes, settings.bootstrap, int(cfg.seed))
    source = str(cfg.ckpt_path) if cfg.get("ckpt_path") else str(
        cfg.policy.get("pretrained_path") or cfg.policy.get("pretrained") or cfg.policy.get("_target_", "policy"))
    title = (f"structure influence: {source} | {benchmark.name}, sampler {sampler.name} T={sampler.num_steps}, "
             f"φ={settings.fraction} ({settings.partition_key}), n={settings.rollouts}, M={settings.resamples}")
    table = format_table(rows)
    seconds = time.perf_counter() - started
    result = {"policy": source, "benchmark": benchmark.name, "sampler": asdict(sampler), "seed": int(cfg.seed),
              "settings": asdict(settings), "seconds": seconds, "summary": rows,
              "prompts": [p.to_json() for p in probes]}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "structure_influence.json").write_text(json.dumps(result, indent=1) + "\n")
    (output_dir / "structure_influence.md").write_text(title + "\n\n" + table + "\n")
    plot(rows, output_dir / "structure_influence.png", title)
    print(title)
    print()
    print(table)
    print(f"({seconds:.0f} s) written: {output_dir / 'structure_influence.json'}, .md, .png")
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="structure_influence")
def main(cfg: DictConfig) -> None:
    run_or_exit_on_config_error(run, cfg, log)


if __name__ == "__main__":
    main()
