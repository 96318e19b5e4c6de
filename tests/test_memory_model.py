"""The memory model of experiments/benchmarks/memory.py against numbers derived without its formulas: parameters
counted on a real LLaDA model (torch), the bytes autograd saves in a real block forward, the printed tables against
bytes from those counts; the 8B targets; and (slow) its agreement with the measured peak of a real forward +
backward on CPU."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "memory.py"


def load_memory_module():
    spec = importlib.util.spec_from_file_location("htgrpo_memory_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


M = load_memory_module()
GB = 1e9


def _llada(shape, n_layers: int, lora_r: int = 0, targets=None, device: str = "cpu"):
    """A real ``LLaDAModelLM`` with ``shape``'s widths (``n_layers`` blocks), LoRA applied through peft as fit does."""
    import types

    import torch

    from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM
    from htgrpo.policies.lora import apply_lora

    config = LLaDAConfig(d_model=shape.d_model, n_heads=shape.n_heads, n_layers=n_layers,
                         mlp_hidden_size=shape.mlp_hidden, vocab_size=shape.embedding_rows,
                         embedding_size=shape.embedding_rows, max_sequence_length=64, rope_theta=10000.0,
                         mask_token_id=shape.embedding_rows - 1)
    with torch.device(device):
        holder = types.SimpleNamespace(backbone=LLaDAModelLM(config))
        lora = {"r": lora_r, "alpha": 2 * lora_r, "target_modules": list(targets or M.ALL_TARGETS)}
        apply_lora(holder, lora if lora_r else None, False)
    return holder.backbone


@pytest.fixture(scope="module")
def mmada_counts() -> dict[str, int]:
    """Parameters of MMaDA-8B's geometry counted with torch (meta device, nothing allocated): one full-width block,
    what lies outside the blocks, and the LoRA adapters of one block."""
    one = _llada(M.MMADA_8B, 1, device="meta")
    block = sum(p.numel() for n, p in one.named_parameters() if ".blocks." in n)
    outside = sum(p.numel() for n, p in one.named_parameters() if ".blocks." not in n)
    lora_all = sum(p.numel() for p in _llada(M.MMADA_8B, 1, 128, device="meta").parameters() if p.requires_grad)
    lora_qv = sum(p.numel() for p in _llada(M.MMADA_8B, 1, 8, ("q_proj", "v_proj"), device="meta").parameters()
                  if p.requires_grad)
    return {"block": block, "outside": outside, "lora_all": lora_all, "lora_qv": lora_qv}


def test_parameter_counts_match_a_counted_model(mmada_counts):
    shape = M.MMADA_8B
    assert shape.block_params() == mmada_counts["block"]
    assert shape.outside_block_params() == mmada_counts["outside"]
    assert shape.params() == 32 * mmada_counts["block"] + mmada_counts["outside"]
    assert round(shape.params() / 1e9, 2) == 8.08  # MMaDA-8B
    assert M.lora_params(shape, 128) == 32 * mmada_counts["lora_all"]
    assert M.lora_params(shape, 8, ("q_proj", "v_proj")) == 32 * mmada_counts["lora_qv"]
    # a small geometry, every layer built and counted in full
    small = M.ModelShape(d_model=64, n_layers=3, n_heads=2, mlp_hidden=96, embedding_rows=50, image_columns=20)
    model = _llada(small, 3)
    assert small.params() == sum(p.numel() for p in model.parameters())
    lora = _llada(small, 3, 5, ("k_proj", "ff_out", "up_proj"))
    assert M.lora_params(small, 5, ("k_proj", "ff_out", "up_proj")) == sum(
        p.numel() for p in lora.parameters() if p.requires_grad)


def _saved_bytes_of_one_block(shape, tokens_per_row: int, rows: int, lora_r: int, bf16_true: bool):
    """Bytes of the tensors autograd saves in one ``LLaDABlock`` forward (``saved_tensors_hooks``), each storage
    once; the weights and the shared RoPE tables are not activations and are left out. Returns (bytes, the bytes of
    the per-row statistics among them: RMSNorm's 1/rms (B, T, 1) and SDPA's logsumexp (B, H, T))."""
    import torch

    from htgrpo.policies.llada import rotary_cos_sin

    torch.manual_seed(0)
    model = _llada(shape, 1, lora_r)
    if bf16_true:  # what Lightning's bf16-true does, then keep_trainable_fp32 puts the adapters back in fp32
        model.to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    (block,) = [m for m in model.modules() if type(m).__name__ == "LLaDABlock"]
    x = torch.randn(rows, tokens_per_row, shape.d_model, dtype=torch.bfloat16 if bf16_true else torch.float32,
                    requires_grad=True)
    cos, sin = rotary_cos_sin(tokens_per_row, shape.d_model // shape.n_heads, 10000.0, x.device)
    not_activations = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    saved: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in not_activations:
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, None)
    per_row = {(rows, tokens_per_row, 1), (rows, shape.n_heads, tokens_per_row)}
    return sum(b for b, _ in saved.values()), sum(b for b, sh in saved.values() if sh in per_row)


@pytest.mark.parametrize("lora_r,bf16_true", [(0, False), (4, False), (4, True)],
                         ids=["full-fp32", "lora-fp32", "lora-bf16-true"])
def test_block_activation_bytes_match_what_autograd_saves(lora_r, bf16_true):
    """The model's per-block count against the tensors a real block forward keeps for its backward. The model leaves
    out the per-row statistics (the two RMSNorms' 1/rms and SDPA's logsumexp: 4·BT·(2 + H) bytes, under 0.1 % at
    MMaDA's widths), so those are taken off the measurement."""
    shape = M.ModelShape(d_model=64, n_layers=1, n_heads=2, mlp_hidden=96, embedding_rows=32, image_columns=16)
    rows, tokens = 2, 16
    measured, per_row = _saved_bytes_of_one_block(shape, tokens, rows, lora_r, bf16_true)
    assert per_row == 4 * rows * tokens * (2 + shape.n_heads)
    s, a = (2, 4) if bf16_true else (4, 4)
    assert M.block_saved_bytes(shape, rows * tokens, s, a, lora_r) == measured - per_row


def test_checkpointing_keeps_only_block_inputs():
    setup = replace(M.experiment_setup("mmada_ht"), micro_batch=1, gradient_checkpointing=False)
    ckpt = replace(setup, gradient_checkpointing=True)
    s, a = M.dtype_bytes(setup)
    bt = setup.tokens
    block = M.block_saved_bytes(setup.shape, bt, s, a, setup.lora_r)
    assert M.activation_bytes(setup) - M.activation_bytes(ckpt) == 32 * block - (32 * 2 * bt * 4096 + block)


def test_targets_lora_fits_one_80gb_gpu_with_micro_batch_3_and_full_ft_fits_8_gpus():
    gpu = 80 * GB
    lora = M.experiment_setup("mmada_ht")  # read from conf/experiment/mmada_ht.yaml
    assert (lora.lora_r, lora.tokens, lora.image_tokens, lora.num_generations, lora.inner_iterations,
            lora.micro_batch, lora.gradient_checkpointing) == (128, 1283, 1024, 9, 6, 3, True)
    for checkpointing in (False, True):
        setup = replace(lora, gradient_checkpointing=checkpointing)
        assert M.max_micro_batch(setup, gpu) >= 3
        m = M.estimate(setup, 3)
        assert m.reference == 0 and m.weights == 2 * M.MMADA_8B.params()  # bf16 frozen weights, no second copy
    full = replace(lora, lora_r=0, precision="bf16-mixed", gpus=8)
    fsdp = replace(full, strategy="fsdp")
    # FSDP (blocks sharded, wte / LM head / norms replicated): micro-batch 3 fits with and without checkpointing
    assert M.fits(M.estimate(replace(fsdp, gradient_checkpointing=False)), gpu)
    assert M.max_micro_batch(fsdp, gpu) == 9
    # ZeRO-3: one backward over all G = 9 images; fits with gradient checkpointing (the experiment's default) only
    zero3 = replace(full, strategy="deepspeed_zero3")
    assert M.estimate(zero3).micro_batch == 9 and M.fits(M.estimate(zero3), gpu)
    assert not M.fits(M.estimate(replace(zero3, gradient_checkpointing=False)), gpu)
    assert M.max_micro_batch(replace(zero3, gradient_checkpointing=False), gpu) < 9
    assert M.max_micro_batch(replace(full, strategy="ddp", gradient_checkpointing=True), gpu) == 0  # replicated


def test_fsdp_replicates_what_is_outside_the_blocks_by_hand():
    # D = 10, F = 30, L = 2, V = 50: block = 4·100 + 3·300 + 20 = 1320; outside = 2·50·10 + 10 = 1010; P = 3650
    shape = M.ModelShape(d_model=10, n_layers=2, n_heads=2, mlp_hidden=30, embedding_rows=50, image_columns=20)
    assert shape.block_params() == 1320 and shape.outside_block_params() == 1010 and shape.params() == 3650
    setup = M.Setup(name="tiny", shape=shape, tokens=7, image_tokens=4, num_generations=3, prompts_per_step=2,
                    inner_iterations=6, micro_batch=2, lora_r=0, gradient_checkpointing=False,
                    precision="bf16-mixed", strategy="fsdp", gpus=4)
    m = M.estimate(setup)
    gathered = 2 * 2 * 1320  # current and prefetched block, bf16
    assert m.weights == 4 * 2640 / 4 + 4 * 1010 + gathered == 11_960
    assert m.gradients == 4 * 2640 / 4 + 4 * 1010 == 6_680
    assert m.optimizer == 8 * 2640 / 4 + 8 * 1010 == 13_360
    assert m.reference == 2 * 3650  # the frozen replica, cast to bf16 by keep_out_of_strategy
    assert m.micro_batch == 2
    # ZeRO-3 shards everything, but the update is one backward over the rollout batch (2 prompts · G = 3)
    zero3 = replace(setup, strategy="deepspeed_zero3")
    z = M.estimate(zero3)
    assert (z.weights, z.gradients, z.optimizer) == (6 * 3650 / 4 + gathered, 4 * 3650 / 4, 8 * 3650 / 4)
    assert z.micro_batch == 6 and z.activations == M.activation_bytes(setup, 6)
    with pytest.raises(ValueError, match="micro_batch_size=null"):
        M.estimate(zero3, 2)
    assert M.estimate(replace(setup, strategy="ddp")).reference == 4 * 3650  # ddp keeps the fp32 copy


def test_experiment_overrides_reach_the_setup():
    setup = M.experiment_setup("mmada_ht", ["policy.max_text_len=512", "policy.lora.r=0", "algorithm.num_generations=4"])
    assert setup.tokens == 513 + 1 + 1024 + 1 == 1539 and setup.lora_r == 0 and setup.num_generations == 4
    with pytest.raises(ValueError, match="MMaDA-8B shape only"):
        M.experiment_setup("shapes_ht")


def _table_rows(out: str) -> dict[str, list[str]]:
    """Printed markdown rows by their set-up label."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| mmada_ht"):
            rows[cells[0]] = cells[1:]
    return rows


def test_the_script_prints_the_static_memory_of_a_counted_model(capsys, mmada_counts):
    """The printed per-GPU GB of weights, reference, adapters, gradients and optimiser state, against bytes derived
    from the counted parameters: bf16 = 2 bytes, fp32 = 4, AdamW two fp32 moments = 8 per trainable parameter."""
    assert M.main([]) == 0
    rows = _table_rows(capsys.readouterr().out)
    P_b, P_o = 32 * mmada_counts["block"], mmada_counts["outside"]
    P, P_lora = P_b + P_o, 32 * mmada_counts["lora_all"]
    gathered = 2 * 2 * mmada_counts["block"]  # FSDP / ZeRO-3 gather the current and the prefetched block in bf16

    def gb(cells, n):
        return [float(c) for c in cells[1:1 + n]]

    # columns: GPUs, micro-batch, weights, reference, adapters, grads, optimiser
    lora = rows["mmada_ht LoRA r=128 bf16-true + ckpt"]
    assert lora[0] == "1" and lora[1] == "3"
    assert gb(lora[1:], 5) == [round(2 * P / GB, 1), 0.0, round(4 * P_lora / GB, 2), round(4 * P_lora / GB, 2),
                               round(8 * P_lora / GB, 2)]
    fsdp = rows["mmada_ht full FT fsdp bf16-mixed + ckpt"]  # blocks sharded over 8 GPUs, the rest replicated
    assert fsdp[0] == "8" and gb(fsdp[1:], 5) == [round((4 * P_b / 8 + 4 * P_o + gathered) / GB, 1),
                                                  round(2 * P / GB, 1), 0.0, round((4 * P_b / 8 + 4 * P_o) / GB, 2),
                                                  round((8 * P_b / 8 + 8 * P_o) / GB, 2)]
    zero3 = rows["mmada_ht full FT deepspeed_zero3 bf16-mixed + ckpt"]  # everything sharded, bf16 + fp32 master
    assert zero3[1] == "9" and gb(zero3[1:], 5) == [round((6 * P / 8 + gathered) / GB, 1), round(2 * P / GB, 1),
                                                    0.0, round(4 * P / 8 / GB, 2), round(8 * P / 8 / GB, 2)]
    ddp = rows["mmada_ht full FT ddp bf16-mixed + ckpt"]  # replicated fp32 weights, reference, grads, moments
    assert gb(ddp[1:], 5) == [round(4 * P / GB, 1), round(4 * P / GB, 1), 0.0, round(4 * P / GB, 2),
                              round(8 * P / GB, 2)]
    assert ddp[-2:] == ["no", "0"]


@pytest.mark.slow
def test_the_model_agrees_with_the_measured_peak_within_20_percent():
    """Reduced-depth LLaDA (real code, MMaDA's 1283 tokens) on CPU: peak RSS of forward + backward vs the model."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak resident memory")
    rows = M.self_check()
    assert len(rows) == 5
    for row in rows:
        assert abs(row["error"]) <= 0.2, row
