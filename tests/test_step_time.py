"""The step-time model (experiments/benchmarks/step_time.py) and the one-command GPU check (gpu_step.py).

FLOP formulas against hand-computed values and against torch's own FLOP counter on a real LLaDA forward and
forward + backward (LoRA, gradient checkpointing); the phase counts of mmada_ht from its composed config; and
``gpu_step.py --small`` end to end on CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"htgrpo_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


S = _load("step_time")


def test_formulas_hand_computed():
    assert S.linear_flops(3, 4, 5) == 120                      # 2·3·4·5
    assert S.attention_flops(2, 10, 8) == 6400                 # 4·2·10²·8
    shape = S.ModelShape(d_model=2, n_layers=3, n_heads=1, mlp_hidden=3, embedding_rows=10, image_columns=4)
    # one token: q,k,v,o 4·(2·2·2) = 32; ff_proj, up_proj 2·(2·2·3) = 24; ff_out 2·3·2 = 12
    assert S.block_linear_flops(shape, 1) == 68
    # LoRA r = 1 on the 7 targets, one token: Σ 2·in·1 + 2·1·out = 2·Σ(in + out) = 2·(4·4 + 5 + 5 + 5) = 62
    assert S.lora_flops(shape, 1, 1) == 62
    assert S.lora_flops(shape, 1, 0) == 0
    assert S.head_flops(5, 2, 4) == 80                         # 2·5·2·4
    p = S.pass_flops(shape, sequences=2, seq_len=3, head_positions=2, lora_r=1)
    assert p.base_linear == 3 * 68 * 6 and p.attention == 3 * 4 * 2 * 9 * 2 and p.lora == 3 * 62 * 6
    assert p.head == 2 * 4 * 2 * 4
    # backward: frozen base and head 1×, attention and LoRA 2×, + recompute of the blocks with checkpointing
    # the first block's q, k, v input gradients (base 3·2·6·2·2, lora_A 3·2·6·2·1) are never computed under LoRA
    assert p.first_block_input_grads == 144 + 72
    skip = p.first_block_input_grads
    assert S.backward_flops(p, lora=True, checkpointing=False) == (p.base_linear + 2 * p.attention + 2 * p.lora
                                                                   + p.head - skip)
    assert S.backward_flops(p, lora=True, checkpointing=True) == (2 * p.base_linear + 3 * p.attention + 3 * p.lora
                                                                  + p.head)
    full = S.pass_flops(shape, 2, 3, 2)
    assert S.update_flops(full, lora=False, checkpointing=False) == 3 * full.forward


def test_stage_positions_and_sampler_passes():
    alg = {"stages": {"n_global": 2, "n_struct": 2, "n_refine": 2, "scored_fraction": 1.0},
           "partition": {"fraction": 0.25}}
    assert S.stage_head_positions(alg, 1024) == (1024, 1024, 256, 256, 768, 768)
    alg["stages"]["scored_fraction"] = 0.5
    assert S.stage_head_positions(alg, 1024) == (512, 512, 128, 128, 384, 384)
    assert S.emerge_forward_passes(12) == 12
    # MaskGIT at N = 1 with 4 steps: float64 rule commits the lone token only at the last step -> 1 forward
    assert S.maskgit_forward_passes(1, 4) == 1
    assert S.maskgit_forward_passes(1024, 15, "mmada") == 15


def test_mmada_ht_step_from_config():
    st = S.llada_step_from_config("mmada_ht")
    assert (st.seq_len, st.image_tokens, st.images, st.sampler_passes, st.cfg) == (1283, 1024, 9, 12, True)
    assert st.update_head_positions == (1024, 1024, 256, 256, 768, 768)
    assert st.lora_r == 128 and st.checkpointing and st.beta == 0.01
    fl = S.llada_phase_flops(st)
    # rollout = 12 passes over 18 sequences; a pass's body ≈ 2·(L·block params)·tokens (+ attention, LoRA, head)
    body = 2 * 32 * S.MMADA_8B.block_params() * 18 * 1283
    assert body < fl.rollout / 12 < 1.25 * body
    # old/ref: one policy pass (LoRA) and one reference pass (no LoRA) over 9 sequences
    one = S.pass_flops(S.MMADA_8B, 9, 1283, 1024, 128)
    assert fl.old_ref == one.forward + S.pass_flops(S.MMADA_8B, 9, 1283, 1024, 0).forward
    assert fl.update == sum(S.update_flops(S.pass_flops(S.MMADA_8B, 9, 1283, k, 128), True, True)
                            for k in st.update_head_positions)
    secs = S.predicted_seconds(fl, S.Hardware("h100", mfu=0.5))
    assert secs["total"] == pytest.approx(fl.total / (989e12 * 0.5))


def _tiny_llada(lora_r: int, checkpointing: bool):
    import types

    from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM
    from htgrpo.policies.lora import apply_lora

    config = LLaDAConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=64, embedding_size=64,
                         max_sequence_length=64, rope_theta=10000.0, mask_token_id=63)
    holder = types.SimpleNamespace(backbone=LLaDAModelLM(config))
    lora = {"r": lora_r, "alpha": 2 * lora_r, "dropout": 0.0} if lora_r else None
    apply_lora(holder, lora, checkpointing)
    model = holder.backbone
    model.train()
    shape = S.ModelShape(d_model=32, n_layers=2, n_heads=4, mlp_hidden=48, embedding_rows=64, image_columns=16)
    return model, shape


@pytest.mark.parametrize("lora_r,checkpointing", [(0, False), (4, False), (4, True), (0, True)])
def test_flops_match_torch_flop_counter(lora_r, checkpointing):
    """The model's forward and forward + backward FLOPs equal what torch.utils.flop_counter counts on a real LLaDA
    (matmuls and attention), with the LM head at K positions over 16 columns. Attention runs SDPA's math backend,
    whose matmuls the counter sees (it has no formula for the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, shape = _tiny_llada(lora_r, checkpointing)
    B, T, K = 3, 20, 6
    ids = torch.randint(0, 63, (B, T))
    positions = slice(T - K, T)

    def forward():
        hidden = model.final_hidden(ids, None, positions)
        return model.project(hidden, slice(0, 16)).float()

    p = S.pass_flops(shape, B, T, K, lora_r)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        forward()
    assert fwd.get_total_flops() == p.forward
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as both:
        forward().logsumexp(-1).sum().backward()
    predicted = S.update_flops(p, lora=lora_r > 0, checkpointing=checkpointing)
    if checkpointing:  # whether the first block's q/k/v input grads run depends on how the checkpoint wrapper
        # treats the embedding output (here 1-4% of this 2-layer model's FLOPs; 1/32 of that at 32 layers)
        assert both.get_total_flops() == pytest.approx(predicted, rel=0.05)
    else:
        assert both.get_total_flops() == predicted


def test_gpu_step_small_runs_on_cpu(tmp_path):
    """gpu_step.py --small: the mmada_ht path end to end on CPU; every phase timed, the model's FLOPs attached."""
    G = _load("gpu_step")
    report = G.run(small=True, steps=2, out=str(tmp_path / "r.json"))
    phases = report["phases"]
    assert set(phases) == {"rollout", "reward", "old_ref", "update"}
    assert all(phases[p]["seconds"] > 0 for p in phases)
    assert phases["reward"]["tflop"] is None
    for p in ("rollout", "old_ref", "update"):
        assert phases[p]["tflop"] > 0 and phases[p]["mfu"] > 0
    assert report["precision"] == "32-true" and report["memory_model_update_bytes"] > 0
    assert (tmp_path / "r.json").exists()


def test_harmon_and_fsdp_counts():
    h = S.HarmonStep(name="h", images=1)
    assert S.cosine_masked(1024, 0, 64) == 1024 and S.cosine_masked(1024, 32, 64) == 724  # 1024·cos(π/4)
    assert S.harmon_head_flops(h, 1) == 12 * 10 * 1536 ** 2
    # one transformer layer, one token, no context beyond itself: q,o 2·2·d², k,v 2·2·d·kv, SwiGLU 3·2·d·f, attn 4·d
    assert S.transformer_layer_flops(1, 1, 1, 4, 8, 2, True) == 2 * 2 * 16 + 2 * 2 * 8 + 3 * 2 * 32 + 4 * 4
    hs = S.harmon_step_from_config("harmon_mar_grpo")
    assert (hs.images, hs.ar_steps, hs.head_steps, hs.train_ar_steps, hs.train_head_steps, hs.mte_trajectories) == \
        (4, 64, 25, 12, 10, 5)
    fl = S.harmon_phase_flops(hs)
    assert fl.rollout > fl.update > 0 and fl.detail["mte"] < fl.rollout
    st = S.llada_step_from_config("mmada_ht")
    traffic = S.fsdp_gather_bytes(st, 8)
    blocks = 32 * S.MMADA_8B.block_params()
    assert traffic["rollout"] == pytest.approx(12 * 2 * blocks * 7 / 8)
    assert traffic["update"] == pytest.approx(6 * (2 * 2 * blocks + 4 * blocks) * 7 / 8)
