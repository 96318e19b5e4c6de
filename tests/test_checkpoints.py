"""The checkpoint room (``htgrpo.checkpoints``): each kind recognised by ``detect_checkpoint_kind`` and loaded by
``load_checkpoint`` once; an unknown folder fails listing the kinds; fit's resume, evaluate's and export's loading go
through it.

Checkpoints are made as the code that writes them makes them: a 1-rollout-step Lightning fit (``.ckpt``, LoRA
``.ckpt``), ``save_pretrained`` / ``save_adapter`` (policy, MAR and adapter folders), ``htgrpo.tiny_checkpoint``
(released MMaDA / DiMOO / Harmon layouts), ``save_lth14_checkpoint`` (MAR ``.pth``), and for the FSDP folder the
layout Lightning's ``FSDPStrategy.save_checkpoint`` writes (torch distributed checkpoint of ``{"model": ...}`` plus
``meta.pt``); the DeepSpeed folder by a 1-step ZeRO-2 run on DeepSpeed's CPU accelerator. The FSDP folders of real
training runs are read through the same functions in ``tests/test_strategies.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from htgrpo.algorithms.ht_grpo import HTGRPO
from htgrpo.checkpoints import (
    KINDS,
    TRAINING_KINDS,
    detect_checkpoint_kind,
    load_checkpoint,
    load_fit_checkpoint,
    load_policy,
    resume_from,
)
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.datamodules import PromptDataModule
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.policies.generators import SamplerSettings
from test_ht_grpo import TINY_POLICY, brightness_reward
from test_strategies import single_rank_group  # noqa: F401  (fixture: tears down the process group)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def cfg(compose):
    """An evaluate config whose `policy` builds the tiny ShapesWorld masked-diffusion policy."""
    return compose("evaluate", ["benchmark=shapes_geneval", *TINY_POLICY])


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def fit_one_rollout_step(policy: torch.nn.Module, cfg, run_dir: Path, strategy="auto"
                         ) -> tuple[HTGRPO, L.Trainer, Path]:
    """One HT-GRPO rollout step (3 updates) on the policy, checkpointed as fit does into RUN/checkpoints/last.ckpt,
    with the run's composed config in RUN/.hydra/config.yaml (what export and a LoRA .ckpt read)."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, run_dir / ".hydra" / "config.yaml")
    torch.manual_seed(0)
    module = HTGRPO(policy, brightness_reward, num_generations=4, sampler=SamplerSettings(name="emerge", num_steps=4),
                    stages={"n_global": 1, "n_struct": 1, "n_refine": 1}, lr=1e-2)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir),
                        accelerator="cpu", devices=1, strategy=strategy, use_distributed_sampler=False,
                        callbacks=[ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True)])
    trainer.fit(module, datamodule=PromptDataModule(ShapesPromptStream(instantiate_node(cfg, "world"), seed=5),
                                                    batch_size=2))
    return module, trainer, run_dir / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------------------------------------------
# Fit's kinds: Lightning .ckpt, LoRA .ckpt, FSDP sharded folder
# ----------------------------------------------------------------------------------------------------------------


def test_lightning_ckpt_loads_into_the_configs_policy_with_its_training_state(tmp_path, cfg):
    policy = instantiate_node(cfg, "policy")
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    module, trainer, ckpt = fit_one_rollout_step(policy, cfg, tmp_path / "run")
    assert detect_checkpoint_kind(ckpt) == "lightning"

    loaded = load_checkpoint(ckpt, cfg)  # evaluate: the weights go into the architecture `policy` builds
    assert loaded.kind == "lightning" and loaded.path == ckpt
    assert_same_state(loaded.policy, module.policy)
    assert any(not torch.equal(start[k], v) for k, v in loaded.policy.state_dict().items())  # the trained weights
    assert loaded.training_state.global_step == trainer.global_step == 3
    assert resume_from(ckpt) == loaded.training_state  # what fit hands to trainer.fit(ckpt_path=...)

    evaluate_cfg = OmegaConf.merge(cfg, {"ckpt_path": str(ckpt)})
    assert_same_state(load_policy(evaluate_cfg), module.policy)  # evaluate / generate
    assert_same_state(load_fit_checkpoint(ckpt), module.policy)  # export: rebuilt from RUN/.hydra/config.yaml


def test_lora_ckpt_is_rebuilt_from_its_run_config(tmp_path, compose):
    base = tmp_path / "base"
    instantiate_node(compose("evaluate", TINY_POLICY), "policy").save_pretrained(base)
    lora_cfg = compose("evaluate", ["benchmark=shapes_geneval", "policy=shapes_llada_warm",
                                    f"policy.pretrained_path={base}", "policy.lora.r=4", "policy.lora.alpha=8"])
    module, trainer, ckpt = fit_one_rollout_step(instantiate_node(lora_cfg, "policy"), lora_cfg, tmp_path / "run")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["htgrpo_frozen_weights_stripped"] and detect_checkpoint_kind(ckpt) == "lightning_lora"

    # The config given names a policy without LoRA: a LoRA .ckpt ignores it and uses the run's own config.
    loaded = load_checkpoint(ckpt, compose("evaluate", ["benchmark=shapes_geneval", *TINY_POLICY]))
    assert loaded.kind == "lightning_lora" and loaded.training_state.global_step == trainer.global_step
    assert_same_state(loaded.policy, module.policy)
    adapters = [k for k in loaded.policy.state_dict() if ".lora_B." in k]
    assert adapters and any(loaded.policy.state_dict()[k].abs().sum() > 0 for k in adapters)  # trained, not fresh


def test_fsdp_sharded_folder_loads_into_the_configs_policy(tmp_path, cfg):
    import torch.distributed.checkpoint as dcp

    trained = instantiate_node(cfg, "policy")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "step000007.ckpt"  # Lightning's FSDPStrategy.save_checkpoint (state_dict_type=sharded)
    dcp.save({"model": {f"policy.{k}": v for k, v in trained.state_dict().items()}}, checkpoint_id=folder)
    torch.save({"global_step": 7, "epoch": 1, "loops": {}}, folder / "meta.pt")
    assert detect_checkpoint_kind(folder) == "fsdp_sharded"

    loaded = load_checkpoint(folder, cfg)
    assert_same_state(loaded.policy, trained)
    assert (loaded.training_state.global_step, loaded.training_state.epoch) == (7, 1)


def test_deepspeed_folder_loads_into_the_configs_policy(tmp_path, cfg, single_rank_group):
    pytest.importorskip("deepspeed")
    from htgrpo.strategies import GRPODeepSpeedStrategy

    module, trainer, folder = fit_one_rollout_step(instantiate_node(cfg, "policy"), cfg, tmp_path / "run",
                                                   strategy=GRPODeepSpeedStrategy(stage=2, allow_cpu=True))
    assert folder.is_dir() and detect_checkpoint_kind(folder) == "deepspeed"
    loaded = load_checkpoint(folder, cfg)  # fp32 weights reassembled from the ZeRO partitions
    assert loaded.training_state.global_step == trainer.global_step == 3
    trained = module.policy.state_dict()
    for name, value in loaded.policy.state_dict().items():
        assert torch.allclose(value, trained[name].float(), atol=1e-6), name


# ----------------------------------------------------------------------------------------------------------------
# Folders: adapter, policy, MAR policy
# ----------------------------------------------------------------------------------------------------------------


def test_adapter_folder_goes_on_the_base_the_config_builds(tmp_path, compose):
    from htgrpo.policies.lora import save_adapter

    base = tmp_path / "base"
    instantiate_node(compose("evaluate", TINY_POLICY), "policy").save_pretrained(base)
    warm = ["benchmark=shapes_geneval", "policy=shapes_llada_warm", f"policy.pretrained_path={base}"]
    with_lora = instantiate_node(compose("evaluate", [*warm, "policy.lora.r=4"]), "policy")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at 0: give the adapters values a load could get wrong
        for name, p in with_lora.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    save_adapter(with_lora, tmp_path / "adapter")
    assert detect_checkpoint_kind(tmp_path / "adapter") == "adapter"

    loaded = load_checkpoint(tmp_path / "adapter", compose("evaluate", warm))
    assert loaded.kind == "adapter" and loaded.training_state is None
    assert_same_state(loaded.policy, with_lora)
    with pytest.raises(ConfigError, match="ckpt_path: .*base"):
        load_checkpoint(tmp_path / "adapter")  # no config: nothing says what the base is


def test_policy_folder_loads_from_the_folder_alone(tmp_path, cfg):
    policy = instantiate_node(cfg, "policy")
    policy.save_pretrained(tmp_path / "policy")
    assert detect_checkpoint_kind(tmp_path / "policy") == "policy_folder"
    loaded = load_checkpoint(tmp_path / "policy")
    assert loaded.kind == "policy_folder"
    assert_same_state(loaded.policy, policy)
    with pytest.raises(ConfigError, match="training resumes only from a checkpoint htgrpo.fit wrote"):
        resume_from(tmp_path / "policy")


def test_mar_policy_folder_loads_from_the_folder_alone(tmp_path, compose):
    mar_cfg = compose("evaluate", ["benchmark=shapes_geneval", "policy=shapes_mar", "policy.d_model=32",
                                   "policy.n_layers=1", "policy.n_heads=2"])
    policy = instantiate_node(mar_cfg, "policy")
    policy.save_pretrained(tmp_path / "mar")
    assert detect_checkpoint_kind(tmp_path / "mar") == "mar_policy_folder"
    loaded = load_checkpoint(tmp_path / "mar")
    assert_same_state(loaded.policy, policy)


# ----------------------------------------------------------------------------------------------------------------
# Released checkpoints
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mmada", "dimoo", "harmon"])
def test_released_folder_given_as_ckpt_path_is_built_by_its_policy(tmp_path, compose, model):
    from htgrpo.tiny_checkpoint import WRITERS

    folder = tmp_path / model
    overrides = WRITERS[model](folder).split()  # what `python -m htgrpo.tiny_checkpoint MODEL DIR` prints
    assert detect_checkpoint_kind(folder) == model
    expected = instantiate_node(compose("evaluate", ["benchmark=shapes_geneval", *overrides]), "policy")
    # the config's policy.pretrained points elsewhere: ckpt_path is the folder that is read
    elsewhere = [o if not o.startswith("policy.pretrained=") else "policy.pretrained=/nowhere" for o in overrides]
    loaded = load_checkpoint(folder, compose("evaluate", ["benchmark=shapes_geneval", *elsewhere]))
    assert loaded.kind == model
    assert_same_state(loaded.policy, expected)


def test_released_folder_with_the_wrong_policy_names_the_right_one(tmp_path, cfg):
    from htgrpo.tiny_checkpoint import write_tiny_harmon

    write_tiny_harmon(tmp_path / "harmon")
    with pytest.raises(ConfigError, match="set policy=harmon"):
        load_checkpoint(tmp_path / "harmon", cfg)  # cfg's policy is shapes_llada


def test_lth14_mar_file_and_folder(tmp_path):
    from htgrpo.policies.mar import MAR, MARConfig, save_lth14_checkpoint

    torch.manual_seed(0)
    mar = MAR(MARConfig(seq_h=4, seq_w=4, token_embed_dim=3, encoder_embed_dim=32, encoder_depth=1,
                        encoder_num_heads=2, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
                        buffer_size=4, num_classes=5, diffloss_d=1, diffloss_w=32, num_sampling_steps="5"))
    path = save_lth14_checkpoint(mar, tmp_path / "checkpoint-last.pth")
    assert detect_checkpoint_kind(path) == detect_checkpoint_kind(tmp_path) == "mar_lth14"
    loaded = load_checkpoint(path)
    assert loaded.policy.config == mar.config
    assert_same_state(loaded.policy, mar)
    with pytest.raises(ConfigError, match="not a text-to-image policy"):
        load_policy(OmegaConf.create({"ckpt_path": str(path)}))


# ----------------------------------------------------------------------------------------------------------------
# Unknown paths, and the entry points going through the room
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_folder_and_file_fail_listing_every_kind(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.ckpt")
    for path in (tmp_path / "run", tmp_path / "plain.ckpt"):
        with pytest.raises(ConfigError) as err:
            detect_checkpoint_kind(path)
        assert err.value.key == "ckpt_path" and "no checkpoint kind htgrpo knows" in err.value.message
        assert all(f"- {kind}: " in err.value.message for kind in KINDS)
    with pytest.raises(ConfigError, match="does not exist"):
        detect_checkpoint_kind(tmp_path / "missing")
    assert set(TRAINING_KINDS) < set(KINDS)


def test_fit_and_export_refuse_what_they_cannot_resume_or_export_before_building_anything(tmp_path, compose, cfg):
    from htgrpo.export import export
    from htgrpo.fit import run

    instantiate_node(cfg, "policy").save_pretrained(tmp_path / "policy")
    (tmp_path / "empty").mkdir()
    fit_cfg = compose("fit", ["experiment=shapes_ht", f"paths.output_dir={tmp_path / 'run'}",
                              f"ckpt_path={tmp_path / 'policy'}"])
    with pytest.raises(ConfigError, match="ckpt_path: .*policy folder.*training resumes only"):
        run(fit_cfg)
    fit_cfg.ckpt_path = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no checkpoint kind htgrpo knows"):
        run(fit_cfg)
    assert resume_from(None) is None and resume_from("last").ckpt_path == "last"  # Lightning resolves `last` itself
    with pytest.raises(ConfigError, match="expected a checkpoint written by htgrpo.fit"):
        export(tmp_path / "policy", tmp_path / "out")
