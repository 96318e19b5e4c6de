"""`sampler=mmada` / `sampler=dimoo` commit what the released MMaDA / Lumina-DiMOO samplers commit.

The reference functions below re-state, as facts read from the released code, how each sampler decides how many
tokens stay masked after each step and which ones:

- MMaDA ``MMadaModelLM.t2i_generate`` (Gen-Verse/MMaDA, models/modeling_mmada.py; ``cosine_schedule`` in
  models/sampling.py): ``ratio = 1.0 * (step + 1) / timesteps`` (Python float); ``mask_ratio = cos(torch.tensor(ratio)
  * math.pi * 0.5)`` (a 0-d float32 CPU tensor); ``mask_len = floor(num_vq_tokens * mask_ratio)``, then
  ``max(1, min(unknown - 1, mask_len))``; ``temperature = temperature * (1 - ratio)`` in place; confidence =
  ``log(p(sampled)) + temperature * gumbel`` (decoded positions: log of float32 max); the positions whose confidence
  is below the ``mask_len``-th smallest stay masked. It returns the last step's samples at EVERY position, so the
  token still masked after the last step (mask_len is 1 there) is committed at the last step.
- DiMOO ``generate_image`` (Alpha-VLLM/Lumina-DiMOO, generators/image_generation_generator.py; utils/
  generation_utils.py): the loop breaks once nothing is masked; ``keep_n = floor(float(vq_len) * cos(0.5 * math.pi *
  torch.tensor([(step + 1) / timesteps], device)))`` clamped to >= 1 (0 at the last step), all float32; codes by
  Gumbel-max at ``temperature``; confidence = ``log(p(sampled)) + temperature * gumbel`` over the L masked positions
  only; ``mask_by_random_topk`` clamps the cut-off index to [0, L − 1], and positions below the cut-off stay masked,
  so a lone masked token is committed at once. One prompt at a time (it asserts B == 1).

Our samplers are compared with these references on a table of (N, T) settings: the per-step counts exactly, and the
whole trajectory (which position is committed at which step, and its code) on fixed logits and noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from htgrpo.config import ConfigError
from htgrpo.policies import sampling
from htgrpo.policies.generators import SamplerSettings
from htgrpo.policies.sampling import maskgit_commit_counts, maskgit_sample

TABLE = [(1024, 15), (1024, 64), (4096, 64)] + [(n, t) for n in (16, 64, 256) for t in (4, 8, 12, 16)] + [
    (16, 18), (16, 64), (64, 64), (100, 30), (2304, 50),  # lone-token rule (first three); odd N; 768x768 DiMOO grid
]


# ------------------------------------------------------------------------------------------------------------------
# The released arithmetic, re-stated
# ------------------------------------------------------------------------------------------------------------------


def released_mmada_mask_len(num_tokens: int, step: int, num_steps: int, unknown: int) -> int:
    """MMaDA: mask_len = max(1, min(unknown − 1, floor(N · cos(float32(r) · π · 0.5)))), float32 on the CPU."""
    ratio = 1.0 * (step + 1) / num_steps
    mask_ratio = torch.cos(torch.tensor(ratio) * math.pi * 0.5)
    mask_len = (num_tokens * mask_ratio).floor()
    return int(max(1, min(unknown - 1, mask_len.item())))


def released_dimoo_keep_n(num_tokens: int, step: int, num_steps: int) -> int:
    """DiMOO: keep_n = max(1, floor(float32(N) · cos(0.5 · π · float32(r)))) before the last step, 0 at it."""
    if step == num_steps - 1:
        return 0
    frac = torch.cos(0.5 * math.pi * torch.tensor([(step + 1) / num_steps]))
    return int((torch.tensor([num_tokens]).float() * frac).floor().clamp_min(1).item())


def released_mmada_counts(num_tokens: int, num_steps: int) -> list[int]:
    """Tokens leaving the mask per MMaDA step; whatever is masked after the loop is committed at the last step."""
    unknown, counts = num_tokens, []
    for step in range(num_steps):
        stay = released_mmada_mask_len(num_tokens, step, num_steps, unknown)
        counts.append(unknown - stay)
        unknown = stay
    counts[-1] += unknown  # t2i_generate returns the last step's samples at every position
    return counts


def released_dimoo_counts(num_tokens: int, num_steps: int) -> list[int]:
    """Tokens committed per DiMOO step; 0 for the steps after its loop breaks."""
    unknown, counts = num_tokens, []
    for step in range(num_steps):
        if unknown == 0:  # `if unknown_cnt.item() == 0: break`
            counts.append(0)
            continue
        stay = min(max(released_dimoo_keep_n(num_tokens, step, num_steps), 0), unknown - 1)  # cut-off index clamp
        counts.append(unknown - stay)
        unknown = stay
    return counts


def test_reference_float32_differs_from_float64_where_the_issue_says():
    """The fact the old float64 code missed: N = 16, T = 12, k = 7 keeps 7 (7.9999995 floored), not 8."""
    assert 16 * math.cos(math.pi / 2 * 8 / 12) == pytest.approx(8.000000000000002, abs=0)
    assert released_mmada_mask_len(16, 7, 12, unknown=16) == 7
    assert released_dimoo_keep_n(16, 7, 12) == 7
    old = maskgit_commit_counts(16, 12, rule="float64")
    assert old != released_mmada_counts(16, 12) and old != released_dimoo_counts(16, 12)
    assert old != released_mmada_counts(1024, 15)  # MMaDA's README setting
    assert maskgit_commit_counts(16, 18, rule="mmada") != released_dimoo_counts(16, 18)  # DiMOO's lone-token rule


@pytest.mark.parametrize(("num_tokens", "num_steps"), TABLE)
def test_commit_counts_equal_the_released_counts(num_tokens, num_steps):
    mmada = maskgit_commit_counts(num_tokens, num_steps, rule="mmada")
    dimoo = maskgit_commit_counts(num_tokens, num_steps, rule="dimoo")
    assert mmada == released_mmada_counts(num_tokens, num_steps)
    assert dimoo == released_dimoo_counts(num_tokens, num_steps)
    assert sum(mmada) == sum(dimoo) == num_tokens


def test_commit_counts_equal_the_released_counts_on_a_wide_grid():
    """Every T in 1..64 for the token counts of 256, 512 and 1024 px (and 16 / 100): no setting differs."""
    for num_tokens in (16, 100, 256, 1024, 4096):
        for num_steps in range(1, 65):
            assert maskgit_commit_counts(num_tokens, num_steps, rule="mmada") == released_mmada_counts(
                num_tokens, num_steps), (num_tokens, num_steps)
            assert maskgit_commit_counts(num_tokens, num_steps, rule="dimoo") == released_dimoo_counts(
                num_tokens, num_steps), (num_tokens, num_steps)


# ------------------------------------------------------------------------------------------------------------------
# Trajectories on fixed logits and noise
# ------------------------------------------------------------------------------------------------------------------

CODEBOOK = 16


class FixedModel:
    """Logits that depend on the canvas (so a step that commits other positions changes every later step), and
    Gumbel noise that is a fixed function of (tokens still masked when the step starts, code or confidence noise):
    the released loop and ours then see the same logits and the same noise at the same state."""

    def __init__(self, batch: int, num_tokens: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.base = 2.0 * torch.randn(batch, num_tokens, CODEBOOK, generator=g)
        self.mix = torch.randn(CODEBOOK, CODEBOOK, generator=g)
        self.seed = seed
        self.masked_at_step_start = 0

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, N) codes with −1 masked -> (B, N, C): base + the mean one-hot of committed codes mixed, shifted."""
        self.masked_at_step_start = int((codes == -1).sum(1)[0])
        onehot = torch.nn.functional.one_hot(codes.clamp_min(0), CODEBOOK).float() * (codes >= 0)[..., None].float()
        context = onehot.mean(1, keepdim=True) @ self.mix  # (B, 1, C)
        shifted = torch.roll(onehot, 1, dims=1) @ self.mix  # the left neighbour's code
        return self.base + 3.0 * context + 0.5 * shifted

    def gumbel(self, shape) -> torch.Tensor:
        kind = 1 if len(shape) == 3 else 0  # code noise (B, N, C) or confidence noise (B, N)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.masked_at_step_start * 2 + kind)
        u = torch.rand(*shape, generator=g)
        return -torch.log(-torch.log(u.clamp_min(1e-20)))


def released_mmada_trajectory(model: FixedModel, num_tokens: int, num_steps: int, code_temperature: float,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MMaDA's t2i_generate loop on a batch (given logits = CFG-combined image logits) -> (codes, commit step).

    Codes: Gumbel-max of logits / code_temperature with the model's code noise (MMaDA's multinomial at 1 has this
    distribution), argmax at 0. Log-probabilities are read with log_softmax as in ours (released: log of softmax,
    within an ulp), so that the comparison is about which positions are committed, not about ulp-level ties."""
    canvas = torch.full((model.base.shape[0], num_tokens), -1)
    commit_step = torch.full_like(canvas, -1)
    sampled = canvas
    for step in range(num_steps):
        logits = model.logits(canvas)
        logp = torch.log_softmax(logits, -1)
        if code_temperature > 0:
            drawn = (logits / code_temperature + model.gumbel(logits.shape)).argmax(-1)
        else:
            drawn = logits.argmax(-1)
        unknown = canvas == -1
        sampled = torch.where(unknown, drawn, canvas)
        ratio = 1.0 * (step + 1) / num_steps
        confidence = logp.gather(-1, sampled[..., None]).squeeze(-1)
        confidence = torch.where(unknown, confidence, math.log(torch.finfo(torch.float32).max))
        temperature = temperature * (1.0 - ratio)
        if temperature > 0:
            confidence = confidence + temperature * model.gumbel(confidence.shape)
        for row in range(canvas.shape[0]):
            mask_len = released_mmada_mask_len(num_tokens, step, num_steps, int(unknown[row].sum()))
            cut_off = torch.sort(confidence[row]).values[mask_len]
            masking = confidence[row] < cut_off
            newly = unknown[row] & ~masking
            commit_step[row][newly] = step
            canvas[row] = torch.where(masking, -1, sampled[row])
    leftover = canvas == -1  # returned from the last step's samples
    commit_step[leftover] = num_steps - 1
    return sampled, commit_step


def released_dimoo_trajectory(model: FixedModel, num_tokens: int, num_steps: int,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DiMOO's generate_image loop, one prompt (row) at a time as released -> (codes, commit step)."""
    batch = model.base.shape[0]
    canvas = torch.full((batch, num_tokens), -1)
    commit_step = torch.full_like(canvas, -1)
    for step in range(num_steps):
        if int((canvas == -1).sum(1)[0]) == 0:
            break
        logits_all = model.logits(canvas)  # shared by both rows' forwards (the model is per position)
        code_noise = model.gumbel(logits_all.shape) if temperature > 0 else None
        conf_noise = model.gumbel((batch, num_tokens))
        keep_n = released_dimoo_keep_n(num_tokens, step, num_steps)
        for row in range(batch):
            masked = (canvas[row] == -1).nonzero()[:, 0]
            logits = logits_all[row, masked]  # (L, C): DiMOO reads logits at the masked positions only
            if temperature > 0:
                drawn = (logits / temperature + code_noise[row, masked]).argmax(-1)
            else:
                drawn = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1).gather(-1, drawn[:, None]).squeeze(-1)
            confidence = logp + temperature * conf_noise[row, masked]
            k = min(max(keep_n, 0), masked.numel() - 1)
            cut_off = torch.sort(confidence).values[k]
            stay = confidence < cut_off
            committed = masked[~stay]
            canvas[row, committed] = drawn[~stay]
            commit_step[row, committed] = step
    return canvas, commit_step


@pytest.mark.parametrize(("num_tokens", "num_steps"), TABLE)
@pytest.mark.parametrize("noisy", [False, True], ids=["temperature0", "noise"])
def test_trajectory_equals_the_released_loop(num_tokens, num_steps, noisy, monkeypatch):
    model = FixedModel(batch=2, num_tokens=num_tokens, seed=num_tokens * 131 + num_steps)
    monkeypatch.setattr(sampling, "_gumbel", lambda shape, generator, device: model.gumbel(shape))
    canvas = torch.full((2, num_tokens), -1)
    temperature = 1.0 if noisy else 0.0

    ours = maskgit_sample(lambda codes, s: model.logits(codes), canvas, num_steps=num_steps, guidance_scale=0.0,
                          temperature=temperature, noise_anneal="compound", choice_temperature=temperature,
                          count_rule="mmada")
    codes, steps = released_mmada_trajectory(model, num_tokens, num_steps, temperature, temperature)
    assert torch.equal(ours.commit_step, steps)
    assert torch.equal(ours.codes, codes)

    ours = maskgit_sample(lambda codes, s: model.logits(codes), canvas, num_steps=num_steps, guidance_scale=0.0,
                          temperature=temperature, noise_anneal="none", count_rule="dimoo")
    codes, steps = released_dimoo_trajectory(model, num_tokens, num_steps, temperature)
    assert torch.equal(ours.commit_step, steps)
    assert torch.equal(ours.codes, codes)


def test_float64_counts_give_another_trajectory(monkeypatch):
    """What the old arithmetic did at MMaDA's README setting (1024 tokens, 15 steps): other counts at steps 9 and
    10, and so a different trajectory from there on."""
    model = FixedModel(batch=2, num_tokens=1024, seed=7)
    monkeypatch.setattr(sampling, "_gumbel", lambda shape, generator, device: model.gumbel(shape))
    old = maskgit_sample(lambda codes, s: model.logits(codes), torch.full((2, 1024), -1), num_steps=15,
                         guidance_scale=0.0, temperature=0.0, noise_anneal="compound", choice_temperature=0.0,
                         count_rule="float64")
    _, steps = released_mmada_trajectory(model, 1024, 15, 0.0, 0.0)
    assert not torch.equal(old.commit_step, steps)
    for row in range(2):
        old_counts = torch.bincount(old.commit_step[row], minlength=15)
        released_counts = torch.bincount(steps[row], minlength=15)
        assert torch.equal(released_counts, torch.tensor(released_mmada_counts(1024, 15)))
        assert (old_counts != released_counts).nonzero()[:, 0].tolist() == [9, 10]  # 89/96 against 90/95


# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------


def test_sampler_configs_select_the_released_rules(compose):
    from hydra.utils import instantiate

    for name, rule in (("mmada", "mmada"), ("dimoo", "dimoo"), ("maskgit", "float64"), ("emerge", "float64")):
        cfg = compose("generate", [f"sampler={name}"])
        assert instantiate(cfg.sampler).count_rule == rule, name
    with pytest.raises(ConfigError, match="count_rule"):
        SamplerSettings(count_rule="float32")
    with pytest.raises(ValueError, match="cosine"):
        maskgit_commit_counts(16, 4, "linear", rule="mmada")


def test_settings_pass_the_rule_to_the_sampler(monkeypatch):
    """SamplerSettings(count_rule=dimoo) samples with DiMOO's counts: the lone token is committed at once."""
    model = FixedModel(batch=1, num_tokens=16, seed=3)
    settings = SamplerSettings(name="maskgit", num_steps=18, guidance_scale=0.0, temperature=0.0,
                               noise_anneal="none", count_rule="dimoo")
    out = settings.sample(lambda codes, s: model.logits(codes), torch.full((1, 16), -1))
    per_step = torch.bincount(out.commit_step[0], minlength=18).tolist()
    assert per_step == released_dimoo_counts(16, 18) != released_mmada_counts(16, 18)
