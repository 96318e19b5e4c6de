"""The memory model of experiments/benchmarks/memory.py: hand-computed counts, the 8B targets, and (slow) its
agreement with the measured peak of a real forward + backward on CPU."""

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


def test_parameter_counts_of_the_mmada_shape_by_hand():
    shape = M.MMADA_8B
    # per block: 4·4096² + 3·4096·12288 + 2·4096 = 67,108,864 + 150,994,944 + 8,192
    assert shape.block_params() == 218_112_000
    # 32 blocks + wte and LM head (134656 x 4096 each) + ln_f
    assert shape.params() == 32 * 218_112_000 + 2 * 134_656 * 4096 + 4096 == 8_082_690_048
    # LoRA r=128 on all 7 block Linears: r·(4·(D+D) + 2·(D+F) + (F+D)) = 128·81,920 per block
    assert M.lora_params(shape, 128) == 32 * 128 * 81_920 == 335_544_320
    assert M.lora_params(shape, 8, ("q_proj", "v_proj")) == 32 * 8 * 2 * 8192


def test_block_activation_bytes_by_hand():
    shape = M.ModelShape(d_model=10, n_layers=1, n_heads=2, mlp_hidden=30, embedding_rows=50, image_columns=20)
    bt = 7
    common_fp32 = 2 * 4 * bt * 10 + 4 * 4 * bt * 10 + 3 * 4 * bt * 30  # norm inputs, q k v out, g silu(g) u
    # full fine-tuning, fp32: + normalised inputs (2·BT·D) + Linear inputs (2·BT·D + BT·F)
    assert M.block_saved_bytes(shape, bt, 4, 4, 0) == common_fp32 + 4 * bt * (2 * 10 + 2 * 10 + 30) == 6160
    # LoRA r=3 in fp32: shared inputs (attn-norm out, ff-norm out, silu(g)·u) + lora_A outputs 7·BT·r
    assert M.block_saved_bytes(shape, bt, 4, 4, 3) == common_fp32 + 4 * bt * (10 + 10 + 30) + 7 * 4 * bt * 3 == 6188
    # LoRA in bf16-true: one fp32 input copy per adapted layer (6 of width D, ff_out's of width F)
    common_bf16 = 2 * 4 * bt * 10 + 4 * 2 * bt * 10 + 3 * 2 * bt * 30
    assert M.block_saved_bytes(shape, bt, 2, 4, 3) == common_bf16 + 4 * bt * (6 * 10 + 30) + 7 * 4 * bt * 3 == 5488


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


def test_the_script_prints_both_tables(capsys):
    assert M.main([]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=128 bf16-true + ckpt" in out and "full FT fsdp" in out and "full FT deepspeed_zero3" in out


@pytest.mark.slow
def test_the_model_agrees_with_the_measured_peak_within_20_percent():
    """Reduced-depth LLaDA (real code, MMaDA's 1283 tokens) on CPU: peak RSS of forward + backward vs the model."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak resident memory")
    rows = M.self_check()
    assert len(rows) == 5
    for row in rows:
        assert abs(row["error"]) <= 0.2, row
