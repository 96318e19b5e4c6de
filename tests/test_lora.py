"""LoRA through peft on the LLaDA backbone: targets, merged/unmerged and adapter-disabled logits, gradients,
gradient checkpointing, bf16 adapters, adapter-only checkpoints with exact resume, and both export forms."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from htgrpo.algorithms.ht_grpo import HTGRPO
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.policies.generators import SamplerSettings
from htgrpo.policies.llada import LLaDAModelLM
from htgrpo.policies.lora import (
    AdapterDisabledView,
    apply_lora,
    check_precision,
    is_lora,
    keep_trainable_fp32,
    make_reference,
    merge_lora,
    parameter_counts,
)
from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy
from htgrpo.policies.shapes_llada import build_masked_diffusion_policy
from test_cli import run_cli
from test_ht_grpo import TINY_POLICY, TINY_RL, brightness_reward, read_metrics
from test_strategies import fit as strategy_fit
from test_strategies import single_rank_group  # noqa: F401  (fixture: tears down the process group)

WORLD = ShapesWorldConfig.roomy()
TARGETS = {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}


def tiny(lora=None, **kwargs) -> MaskedDiffusionPolicy:
    return build_masked_diffusion_policy(WORLD, d_model=32, n_layers=2, n_heads=2, lora=lora, **kwargs)


def trained_adapters(policy: MaskedDiffusionPolicy, seed: int = 1) -> MaskedDiffusionPolicy:
    """Seeded adapter weights with a non-zero lora_B (peft initialises lora_B to 0, which would make every
    comparison trivially equal, and lora_A from the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return policy


def inputs(policy: MaskedDiffusionPolicy):
    prompt = policy.encode_prompts(["a red circle", "two blue squares to the left of a green triangle"])
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, policy.codebook_size, (2, policy.num_image_tokens), generator=gen)
    codes[:, ::3] = -1  # some masked positions
    return codes, prompt


def test_targets_are_the_block_linears_and_never_the_lm_head():
    policy = tiny({"r": 4})
    from peft.tuners.lora import LoraLayer

    adapted = {name for name, module in policy.backbone.named_modules() if isinstance(module, LoraLayer)}
    base = policy.backbone.get_base_model()
    assert adapted == {f"base_model.model.model.transformer.blocks.{i}.{t}" for i in range(2) for t in TARGETS}
    assert type(base.model.transformer["ff_out"]) is torch.nn.Linear  # the LM head shares the name ff_out
    counts = parameter_counts(policy)
    d, f, r = 32, 96, 4
    assert counts["trainable"] == 2 * r * (4 * (d + d) + 2 * (d + f) + (f + d))  # L · Σ r·(in + out)


@pytest.mark.parametrize("targets", [["q_proj", "o_proj"], ["lm_head"]])
def test_a_target_name_absent_from_the_model_fails_at_startup_listing_the_names(compose, targets):
    cfg = compose("fit", ["experiment=shapes_ht", "policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1",
                          "policy.n_heads=2", "policy.lora.r=4", f"policy.lora.target_modules=[{','.join(targets)}]"])
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "policy")
    message = str(err.value)
    assert message.startswith("policy.lora.target_modules:")
    assert repr(targets[-1]) in message and all(t in message for t in TARGETS)


def test_bad_lora_values_name_their_key(compose):
    cfg = compose("fit", ["policy=shapes_llada", "policy.lora.r=-1"])
    with pytest.raises(ConfigError, match="policy.lora.r"):
        instantiate_node(cfg, "policy")


def test_merged_and_unmerged_logits_are_equal():
    policy = trained_adapters(tiny({"r": 4, "alpha": 8}))
    codes, prompt = inputs(policy)
    with torch.no_grad():
        unmerged = policy.image_logits(codes, prompt)
        merged_policy = merge_lora(copy.deepcopy(policy))
        assert not is_lora(merged_policy) and isinstance(merged_policy.backbone, LLaDAModelLM)
        merged = merged_policy.image_logits(codes, prompt)
        base = tiny().image_logits(codes, prompt)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters do change the logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_the_adapter_disabled_reference_equals_the_base_model_and_is_no_copy():
    policy = trained_adapters(tiny({"r": 4}))
    reference = make_reference(policy, beta=0.01)
    assert isinstance(reference, AdapterDisabledView) and not isinstance(reference, torch.nn.Module)
    assert make_reference(policy, beta=0.0) is None
    codes, prompt = inputs(policy)
    with torch.no_grad():
        ref = reference.image_logits(codes, prompt)
        base = tiny().image_logits(codes, prompt)
        current = policy.image_logits(codes, prompt)
    torch.testing.assert_close(ref, base, rtol=0, atol=0)
    assert (current - base).abs().max() > 1e-2  # adapters are back on outside the view
    module = HTGRPO(policy, brightness_reward, num_generations=4, beta=0.01)
    assert module.reference is not None
    copied = pickle.loads(pickle.dumps(module))  # what ddp_spawn does: the view still points at the module's policy
    assert copied.reference._policy is copied.policy
    with torch.no_grad():
        torch.testing.assert_close(copied.reference.image_logits(codes, prompt), base, rtol=0, atol=0)
    assert not any(k.startswith("reference.") for k in module.state_dict())  # nothing duplicated
    # full fine-tuning keeps the frozen copy
    full = HTGRPO(tiny(), brightness_reward, num_generations=4, beta=0.01)
    assert isinstance(full.reference, torch.nn.Module)


def test_only_adapter_parameters_receive_gradients():
    policy = trained_adapters(tiny({"r": 4}))
    codes, prompt = inputs(policy)
    policy.image_logits(codes, prompt).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert with_grad == {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all(p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_gradient_checkpointing_gives_the_same_logits_and_gradients(lora):
    plain, ckpt = tiny(lora), tiny(lora, gradient_checkpointing=True)
    if lora:
        trained_adapters(plain), trained_adapters(ckpt)
    blocks = ckpt.backbone.get_base_model().model.transformer["blocks"] if lora else \
        ckpt.backbone.model.transformer["blocks"]
    assert all(b.gradient_checkpointing for b in blocks)
    codes, prompt = inputs(plain)
    calls = []
    hook = blocks[0].q_proj.register_forward_hook(lambda *a: calls.append(1))  # a layer inside the block
    out = []
    for policy in (plain, ckpt):
        policy.train()
        logits = policy.image_logits(codes, prompt)
        logits.logsumexp(-1).mean().backward()
        out.append((logits, {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}))
    hook.remove()
    assert len(calls) == 2  # forward + recomputation in the backward pass
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    assert out[0][1].keys() == out[1][1].keys()
    for name in out[0][1]:
        torch.testing.assert_close(out[0][1][name], out[1][1][name], rtol=1e-5, atol=1e-7)


def test_bf16_true_trains_fp32_adapters_on_bf16_frozen_weights(tmp_path):
    policy = tiny({"r": 4})
    module = HTGRPO(policy, brightness_reward, num_generations=4, sampler=SamplerSettings(name="emerge", num_steps=4),
                    stages={"n_global": 1, "n_struct": 0, "n_refine": 0}, lr=1e-2, beta=0.01)
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_A" in n}
    # lora_A is kaiming-uniform fp32: nearly every value changes when rounded to bf16, so a restore that only casts
    # back to fp32 (values rounded) differs from one that puts the pre-cast values back
    assert all(not torch.equal(v, v.to(torch.bfloat16).float()) for v in initial.values())

    class AdaptersAtTrainStart(L.Callback):
        """The adapters after Lightning's bf16 cast and configure_optimizers, before the first update."""

        def on_train_start(self, trainer, pl_module):
            self.values = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_A" in n}

    at_start = AdaptersAtTrainStart()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, precision="bf16-true",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu", callbacks=[at_start])
    trainer.fit(module, datamodule=PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2))
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert {dtypes[n] for n in dtypes if ".lora_" in n} == {torch.float32}
    assert {dtypes[n] for n in dtypes if ".lora_" not in n} == {torch.bfloat16}
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in opt_params)
    state = trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    # lora_A kept its exact fp32 initial values through Lightning's bf16 cast (keep_trainable_fp32 restores the
    # snapshot taken in setup), before the first update
    assert at_start.values.keys() == initial.keys()
    for n in initial:
        assert at_start.values[n].dtype == torch.float32
        torch.testing.assert_close(at_start.values[n], initial[n], rtol=0, atol=0)
    # and the update trained the adapters (lora_B starts at zero; lora_A's first gradient is zero because of it)
    assert any(p.detach().abs().max() > 0 for n, p in policy.named_parameters() if "lora_B" in n)


def test_bf16_true_full_finetuning_is_refused_with_the_key():
    module = HTGRPO(tiny(), brightness_reward, num_generations=4, beta=0.0)
    for check in (check_precision, keep_trainable_fp32):  # at fit's start-up, and again before the optimiser
        with pytest.raises(ConfigError, match="trainer.precision: bf16-true"):
            check(module, "bf16-true")
        check(module, "bf16-mixed")  # fine: fp32 master weights
    check_precision(HTGRPO(tiny({"r": 2}), brightness_reward, num_generations=4), "bf16-true")
    # weights loaded in bf16 and trained in full: refused whatever the trainer precision
    with pytest.raises(ConfigError, match="policy.dtype"):
        check_precision(HTGRPO(tiny().to(torch.bfloat16), brightness_reward, num_generations=4), "bf16-mixed")
    # LoRA on bf16 weights: peft keeps the adapters in fp32
    lora_on_bf16 = apply_lora(tiny().to(torch.bfloat16), {"r": 2})
    assert {p.dtype for p in lora_on_bf16.parameters() if p.requires_grad} == {torch.float32}
    check_precision(HTGRPO(lora_on_bf16, brightness_reward, num_generations=4), "bf16-mixed")


class LossRecorder(L.Callback):
    """rollout step -> the losses and grad norms of its K updates."""

    def __init__(self):
        self.steps: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[module.rollout_step - 1] = [v for u in module.last_update_stats for v in (u.loss, u.kl, u.grad_norm)]


def lora_fit(cfg, steps: int, root: Path, ckpt_path: Path | None = None, every: int | None = None) -> LossRecorder:
    """HT-GRPO with the LoRA policy of ``cfg`` for ``steps`` rollout steps (K = 3 updates each), in-process."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = HTGRPO(instantiate_node(cfg, "policy"), brightness_reward, num_generations=4, lr=1e-2, beta=0.05,
                    sampler=SamplerSettings(name="emerge", num_steps=4),
                    stages={"n_global": 1, "n_struct": 1, "n_refine": 1})
    recorder = LossRecorder()
    callbacks: list[L.Callback] = [recorder]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", filename="step{step:06d}",
                                         auto_insert_metric_name=False, every_n_train_steps=every, save_top_k=-1,
                                         save_last=True))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        callbacks=callbacks, enable_checkpointing=bool(every), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), accelerator="cpu")
    trainer.fit(module, datamodule=PromptDataModule(ShapesPromptStream(WORLD, seed=5), batch_size=2),
                ckpt_path=str(ckpt_path) if ckpt_path else None)
    return recorder


def test_lora_checkpoint_holds_only_adapters_resumes_exactly_and_exports_both_forms(tmp_path, compose):
    # The user flow: a warm-started base folder, HT-GRPO with LoRA on it, then export.
    base_dir = tmp_path / "base"
    instantiate_node(compose("fit", TINY_POLICY), "policy").save_pretrained(base_dir)
    cfg = compose("fit", ["experiment=shapes_ht", "policy=shapes_llada_warm", f"policy.pretrained_path={base_dir}",
                          "policy.lora.r=4", "policy.lora.alpha=8"])
    run_config = tmp_path / "run" / ".hydra" / "config.yaml"  # what a fit run leaves next to its checkpoints
    run_config.parent.mkdir(parents=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run_config)

    full = lora_fit(cfg, 4, tmp_path / "run", every=6)  # checkpoints after 2 and 4 rollout steps (K = 3)
    ckpt = tmp_path / "run" / "checkpoints" / "step000006.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    names = [k for k in saved["state_dict"] if k.startswith("policy.")]
    assert names and all(".lora_A." in k or ".lora_B." in k for k in names)
    assert len(saved["optimizer_states"][0]["state"]) == len(names)  # AdamW state: adapters only

    resumed = lora_fit(cfg, 4, tmp_path / "resumed", ckpt_path=ckpt)
    assert sorted(full.steps) == [0, 1, 2, 3] and sorted(resumed.steps) == [2, 3]
    for step in (2, 3):
        assert resumed.steps[step] == pytest.approx(full.steps[step], rel=1e-6, abs=1e-9), step
    assert all(kl > 0 for kl in full.steps[3][1::3])  # the adapter-disabled reference differs from the policy

    from peft import PeftModel

    from htgrpo.checkpoints import load_fit_checkpoint, load_policy
    from htgrpo.export import export

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(export(last, adapter_dir))
    assert {"config.json", "model.safetensors"} <= set(export(last, merged_dir, merge=True))
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and Path(adapter_config["base_model_name_or_path"]) == base_dir

    trained = load_fit_checkpoint(last).eval()  # the trained policy, rebuilt from the run's config
    codes, prompt = inputs(trained)
    ids, mask = trained.sequences(codes, prompt)
    with torch.no_grad():
        expected = trained.backbone(ids, attention_mask=mask).logits
        assert (expected - LLaDAModelLM.from_pretrained(base_dir)(ids, attention_mask=mask).logits).abs().max() > 1e-3
        via_peft = PeftModel.from_pretrained(LLaDAModelLM.from_pretrained(adapter_config["base_model_name_or_path"]),
                                             adapter_dir).eval()
        torch.testing.assert_close(via_peft(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
        via_transformers = LLaDAModelLM.from_pretrained(merged_dir).eval()
        torch.testing.assert_close(via_transformers(ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)

    # htgrpo.evaluate reads all three: the LoRA .ckpt, the adapter folder (on its base policy), the merged folder
    cfgs = [OmegaConf.create({"ckpt_path": str(last)}),
            OmegaConf.merge(OmegaConf.load(run_config), {"ckpt_path": str(adapter_dir), "policy": {"lora": {"r": 0}}}),
            OmegaConf.create({"ckpt_path": str(merged_dir)})]
    for c in cfgs:
        policy = load_policy(c).eval()
        with torch.no_grad():
            got = policy.image_logits(codes, prompt)
            torch.testing.assert_close(got, trained.image_logits(codes, prompt), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lora_fit_and_export_commands(tmp_path, compose):
    """The commands a user runs: fit with policy.lora.r, then `htgrpo.export` in both forms (subprocesses)."""
    base_dir = tmp_path / "base"
    instantiate_node(compose("fit", TINY_POLICY), "policy").save_pretrained(base_dir)
    run = tmp_path / "run"
    run_cli("htgrpo.fit", ["experiment=shapes_ht", *(o for o in TINY_RL if o != "policy=shapes_llada"),
                           "policy=shapes_llada_warm", f"policy.pretrained_path={base_dir}", "policy.lora.r=4",
                           f"hydra.run.dir={run}", "trainer.limit_train_batches=2"], tmp_path)
    assert sorted(read_metrics(run)) == [0, 1]
    last = run / "checkpoints" / "last.ckpt"
    out = run_cli("htgrpo.export", [f"ckpt_path={last}", f"out={tmp_path / 'adapter'}",
                                    f"hydra.run.dir={tmp_path / 'e1'}"], tmp_path)
    assert "exported adapter policy" in out.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    out = run_cli("htgrpo.export", [f"ckpt_path={last}", f"out={tmp_path / 'merged'}", "merge=true",
                                    f"hydra.run.dir={tmp_path / 'e2'}"], tmp_path)
    assert "exported merged policy" in out.stdout
    assert LLaDAModelLM.from_pretrained(tmp_path / "merged").config.n_layers == 1
    bad = run_cli("htgrpo.export", [f"out={tmp_path / 'x'}", f"hydra.run.dir={tmp_path / 'e3'}"], tmp_path,
                  check=False)
    assert bad.returncode != 0 and "ckpt_path" in bad.stderr + bad.stdout


def test_lora_under_fsdp_trains_like_one_device_and_resumes_from_the_sharded_folder(tmp_path, single_rank_group):
    """Real FSDP (one CPU rank, gloo): LoRA blocks as FSDP units with frozen and trainable parameters together, the
    adapter-disabled reference, and resume through the sharded checkpoint folder (which keeps the frozen shards)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from htgrpo.strategies import GRPOFSDPStrategy

    def module():
        policy = trained_adapters(tiny({"r": 4}))
        return HTGRPO(policy, brightness_reward, num_generations=4, sampler=SamplerSettings(name="emerge", num_steps=4),
                      stages={"n_global": 1, "n_struct": 1, "n_refine": 1}, lr=1e-2, beta=0.05)

    _, plain = strategy_fit(module(), tmp_path / "plain", 3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=3, save_top_k=-1)
    _, sharded = strategy_fit(module(), tmp_path / "fsdp", 3, strategy=GRPOFSDPStrategy(), callbacks=[ckpt])
    for step in range(3):
        assert [v for u in sharded[step] for v in u] == pytest.approx([v for u in plain[step] for v in u],
                                                                      rel=1e-5, abs=1e-8)
    _, tail = strategy_fit(module(), tmp_path / "resumed", 3, strategy=GRPOFSDPStrategy(),
                           ckpt_path=str(tmp_path / "ckpt" / "step000003.ckpt"))
    assert sorted(tail) == [1, 2]
    for step in (1, 2):
        assert [v for u in tail[step] for v in u] == pytest.approx([v for u in sharded[step] for v in u],
                                                                   rel=1e-6, abs=1e-9)
