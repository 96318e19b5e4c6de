"""The reward interface: safe scoring (exceptions -> NaN, counted, advantage 0), mix, JPEG, registry errors."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from htgrpo.algorithms.grpo_math import group_advantages
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.rewards.base import Reward, RewardOutput, reward_log, safe_score
from htgrpo.rewards.jpeg import JPEGReward, jpeg_size_kb
from htgrpo.rewards.mix import MixReward
from htgrpo.rewards.shapes import ShapesPromptReward

WORLD = ShapesWorldConfig.roomy()


def _without_hydra(cfg):
    """A composed config as ``htgrpo.fit.run`` gets it inside ``@hydra.main`` (no ``hydra`` node to log)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg
TINY_RL = ["policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "data.batch_size=2",
           "algorithm.num_generations=4", "sampler.num_steps=4", "benchmark.prompts.per_task=1",
           "benchmark.images_per_prompt=1", "callbacks.progress_bar=null", "algorithm.stages.n_global=1",
           "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1", "validate_at_start=false",
           "validate_at_end=false", "logger=csv", "trainer.limit_train_batches=2"]


class ListReward(Reward):
    """Returns fixed scores (per call, the next ``len(records)`` values of ``values``), for hand-computed tests."""

    def __init__(self, values, name="list"):
        super().__init__()
        self.values, self.name = list(values), name

    def score(self, images, records):
        n = len(records)
        out, self.values = self.values[:n], self.values[n:]
        return RewardOutput(torch.tensor(out), {"half": torch.tensor(out) / 2})


class FlakyShapesReward(ShapesPromptReward):
    """The ShapesWorld reward, except that every batch of more than one image raises, and so does every third
    single-image call: exercises both failure paths of ``safe_score`` inside a real ``fit`` run."""

    calls = 0

    def score(self, images, records):
        if len(records) > 1:
            raise RuntimeError("scorer crashed on the batch")
        FlakyShapesReward.calls += 1
        if FlakyShapesReward.calls % 3 == 0:
            raise RuntimeError("scorer crashed on one image")
        return super().score(images, records)


def _images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---- safe_score -------------------------------------------------------------------------------------------
def test_safe_score_turns_a_failing_image_into_nan_and_keeps_the_others():
    def reward(images, records):
        if "bad" in records:
            raise ValueError("cannot score")
        return images.float().mean(dim=(1, 2, 3))

    images = _images(4)
    out = safe_score(reward, images, ["ok", "bad", "ok", "bad"])
    expected = images.float().mean(dim=(1, 2, 3))
    assert out.num_failed == 2
    assert torch.isnan(out.scores[[1, 3]]).all()
    assert torch.equal(out.scores[[0, 2]], expected[[0, 2]])
    # advantage 0 for the failed images, counted as non-finite
    adv = group_advantages(out.scores, num_generations=4)
    assert adv.nonfinite_rewards == 2 and adv.advantages[1] == 0 and adv.advantages[3] == 0


def test_safe_score_whole_batch_failure_and_components_survive_the_retry():
    class Always(Reward):
        def score(self, images, records):
            raise RuntimeError("model crashed")

    out = safe_score(Always(), _images(3), [None] * 3)
    assert out.num_failed == 3 and torch.isnan(out.scores).all()
    # batch fails (length mismatch), per-image retries succeed: components are concatenated
    lr = ListReward([1.0, 2.0, 3.0])
    lr.score = lambda images, records, f=lr.score: f(images, records) if len(records) == 1 else RewardOutput(torch.zeros(2))
    out = safe_score(lr, _images(3), [None] * 3)
    assert out.num_failed == 0 and out.scores.tolist() == [1.0, 2.0, 3.0]
    assert out.components["half"].tolist() == [0.5, 1.0, 1.5]


def test_reward_log_means_finite_component_values():
    out = RewardOutput(torch.tensor([1.0, 2.0, 3.0]), {"a": torch.tensor([1.0, math.nan, 4.0]),
                                                      "b": torch.tensor([math.nan] * 3)})
    assert reward_log(out) == {"train/reward/a": 2.5}  # b has no finite value: not logged


def test_reward_output_rejects_mismatched_components():
    with pytest.raises(ValueError, match="component 'a'"):
        RewardOutput(torch.zeros(3), {"a": torch.zeros(2)})


# ---- ShapesWorld reward on the interface --------------------------------------------------------------------
def test_shapes_reward_components_are_nan_on_the_other_benchmark():
    stream = ShapesPromptStream(WORLD, seed=3, dpg_fraction=0.5, with_images=True)  # ground-truth scenes
    items = [stream[i] for i in range(8)]
    prompts = [it.prompt for it in items]
    records = [p.record for p in prompts]
    images = torch.stack([it.image for it in items])
    reward = ShapesPromptReward(WORLD, "binary")
    out = reward.score(images, records)
    assert torch.equal(reward(images, records), out.scores)
    is_dpg = torch.tensor([p.group == "dpg" for p in prompts])
    assert is_dpg.any() and (~is_dpg).any()
    assert torch.isnan(out.components["geneval/correct"][is_dpg]).all()
    assert torch.isnan(out.components["dpg/score"][~is_dpg]).all()
    assert torch.equal(out.scores[~is_dpg], out.components["geneval/correct"][~is_dpg])
    assert torch.equal(out.scores[is_dpg], out.components["dpg/score"][is_dpg])
    assert out.scores.min() > 0.99  # ground-truth scenes: the numbers are the rules' own (1.0)


# ---- mix ----------------------------------------------------------------------------------------------------
def test_mix_is_the_weighted_sum_by_hand():
    mix = MixReward({"a": {"weight": 0.5, "reward": ListReward([1.0, 2.0, 4.0], "a")},
                     "b": {"weight": -2.0, "reward": ListReward([10.0, math.nan, 0.25], "b")}})
    out = mix.score(_images(3), [None] * 3)
    # 0.5*1 - 2*10 = -19.5;  image 1: b is NaN -> NaN;  0.5*4 - 2*0.25 = 1.5
    assert out.scores[0].item() == -19.5 and math.isnan(out.scores[1]) and out.scores[2].item() == 1.5
    assert out.num_failed == 1
    assert out.components["a"].tolist() == [1.0, 2.0, 4.0]
    assert out.components["a/half"].tolist() == [0.5, 1.0, 2.0]


def test_mix_builds_parts_from_config_nodes_and_names_bad_keys(compose):
    mix = MixReward({"jpeg": {"weight": 2.0, "reward": {"_target_": "htgrpo.rewards.jpeg.JPEGReward", "quality": 95}}})
    images = _images(2)
    assert torch.allclose(mix(images, [None, None]), 2.0 * JPEGReward()(images, [None, None]))
    cfg = compose("fit", ["experiment=shapes_ht", "reward=mix", "reward.components.task.weight=nan"])
    with pytest.raises(ConfigError, match=r"reward\.components\.task\.weight"):
        instantiate_node(cfg, "reward")
    cfg = compose("fit", ["experiment=shapes_ht", "reward=mix", "reward.components.compressibility.reward.quality=0"])
    with pytest.raises(ConfigError, match=r"reward\.components\.compressibility\.reward\.quality"):
        instantiate_node(cfg, "reward")


def test_mix_config_mixes_shapes_and_jpeg(compose):
    cfg = compose("fit", ["experiment=shapes_ht", "reward=mix"])
    mix = instantiate_node(cfg, "reward")
    assert set(mix.parts) == {"task", "compressibility"}
    assert isinstance(mix.parts["task"], ShapesPromptReward) and isinstance(mix.parts["compressibility"], JPEGReward)
    world = instantiate_node(cfg, "world")
    prompts = [ShapesPromptStream(world, seed=1)[i].prompt for i in range(2)]
    images = _images(2, size=world.grid_size * world.cell_px)
    records = [p.record for p in prompts]
    task = mix.parts["task"](images, records)
    jpeg = JPEGReward()(images, records)
    assert torch.allclose(mix(images, records), task + 0.05 * jpeg)


# ---- JPEG ---------------------------------------------------------------------------------------------------
def test_jpeg_size_is_pil_jpeg95_in_kilobytes_and_prefers_smooth_images():
    smooth = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    smooth[:, 0, :, 32:] = 200  # two flat halves
    noisy = _images(1, size=64)
    buf = io.BytesIO()
    Image.fromarray(noisy[0].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    assert jpeg_size_kb(noisy[0].permute(1, 2, 0).numpy()) == len(buf.getvalue()) / 1000.0
    images = torch.cat([smooth, noisy])
    comp = JPEGReward(compressibility=True)(images, [None, None])
    incomp = JPEGReward(compressibility=False)(images, [None, None])
    assert torch.equal(comp, -incomp)
    assert comp[0] > comp[1]            # the smooth image compresses better
    assert incomp[1] > incomp[0] > 0
    # more noise -> bigger file: monotone in the noise amplitude
    sizes = []
    for amp in (0, 16, 64, 128):
        noise = torch.randint(-amp, amp + 1, (1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
        sizes.append(JPEGReward(False)((128 + noise).clamp(0, 255).to(torch.uint8), [None]).item())
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_jpeg_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        JPEGReward()(torch.zeros(1, 3, 8, 8), [None])


# ---- config: registry ---------------------------------------------------------------------------------------
def test_unknown_reward_name_lists_the_valid_ones(compose):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose("fit", ["experiment=shapes_ht", "reward=nope"])
    for name in ("shapes", "mix", "jpeg_compressibility", "jpeg_incompressibility"):
        assert name in str(err.value)


def test_reward_models_are_not_registered_in_the_lightning_module(compose):
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_RL, "reward=mix"])
    policy = instantiate_node(cfg, "policy")
    module = instantiate_node(cfg, "algorithm", policy=policy, benchmark=None, sampler=instantiate_node(cfg, "sampler"))
    assert isinstance(module.reward_fn, MixReward) and not isinstance(module.reward_fn, torch.nn.Module)
    assert all("reward" not in name for name, _ in module.named_modules())
    assert all("reward" not in k for k in module.state_dict())


# ---- a real fit run with a scorer that raises ---------------------------------------------------------------
def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as fh:
        return [row for row in csv.DictReader(fh) if row.get("train/nonfinite_rewards")]


def test_fit_goes_on_when_the_scorer_raises_and_counts_nan_rewards(compose, tmp_path):
    from htgrpo.fit import run

    FlakyShapesReward.calls = 0
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_RL, "reward._target_=test_rewards.FlakyShapesReward",
                          f"paths.output_dir={tmp_path}"])
    summary = run(_without_hydra(cfg))
    assert summary["steps"] == 2
    rows = _metrics(tmp_path)
    assert len(rows) == 2
    # 8 images a step, each scored alone after the batch crash; every third single-image call raises.
    # step 1: calls 1..8 -> 3, 6 fail (2); step 2: calls 9..16 -> 9, 12, 15 fail (3)
    assert [float(r["train/nonfinite_rewards"]) for r in rows] == [2.0, 3.0]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert "train/reward/geneval/partial" in rows[0]


def test_fit_with_mix_reward_logs_each_component(compose, tmp_path):
    from htgrpo.fit import run

    # the plain reward (no diversity bonus): the logged mean is then the mix itself
    cfg = compose("fit", ["experiment=shapes_ht", *TINY_RL, "reward=mix", f"paths.output_dir={tmp_path}",
                          "algorithm.diversity_bonus.weight=0"])
    assert run(_without_hydra(cfg))["steps"] == 2
    rows = _metrics(tmp_path)
    assert len(rows) == 2
    for row in rows:
        task, comp = float(row["train/reward/task"]), float(row["train/reward/compressibility"])
        assert comp < 0 and float(row["train/reward/compressibility/jpeg/size_kb"]) == pytest.approx(-comp, rel=1e-5)
        # the logged mean of the mix is the weighted sum of the logged component means (no NaN here)
        assert float(row["train/reward/mean"]) == pytest.approx(1.0 * task + 0.05 * comp, abs=1e-5)
        assert float(row["train/nonfinite_rewards"]) == 0


# ---- preference rewards on a tiny random CLIP saved in the released format -------------------------------------
CLIP_WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "a", "photo", "of", "red", "blue", "green", "circle", "square", "dog",
              "cat", "two", "and"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel (config.json + safetensors), a `tokenizers` tokenizer and a CLIP image processor in one
    folder: the layout of a hub CLIP repo, loaded by the same from_pretrained calls."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = {w: i for i, w in enumerate(CLIP_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(CLIP_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def _clip_reference(folder: Path, images: torch.Tensor, prompts: list[str]):
    """Independent path: CLIPModel.forward's own logits (normalised embeddings x logit scale)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    scale = model.logit_scale.exp()
    return out.logits_per_image.diagonal() / scale, scale, out.image_embeds


def test_clip_score_and_pickscore_match_clip_forward(compose, tiny_clip):
    images = _images(3, size=40)
    prompts = ["a photo of a red circle", "two blue square and a dog", "a green cat"]
    records = [prompts[0], prompts[1], prompts[2]]
    cos, scale, _ = _clip_reference(tiny_clip, images, prompts)
    cfg = compose("fit", ["experiment=shapes_ht", "reward=clip_score", f"reward.model={tiny_clip}", "reward.device=cpu"])
    clip = instantiate_node(cfg, "reward")
    out = clip.score(images, records)
    assert torch.allclose(out.components["clip/cosine"], cos, atol=1e-5)
    assert torch.allclose(out.scores, 100 * cos.clamp(min=0), atol=1e-4)
    cfg = compose("fit", ["experiment=shapes_ht", "reward=pickscore", f"reward.model={tiny_clip}",
                          f"reward.processor={tiny_clip}", "reward.device=cpu"])
    pick = instantiate_node(cfg, "reward")
    assert torch.allclose(pick(images, records), scale * cos, atol=1e-4)
    # records of the benchmarks carry their prompt
    stream = ShapesPromptStream(WORLD, seed=0, dpg_fraction=0.5)
    recs = [stream[i].prompt.record for i in range(3)]
    assert torch.allclose(clip(images, recs), 100 * _clip_reference(tiny_clip, images, [r.prompt for r in recs])[0].clamp(min=0), atol=1e-4)


def test_aesthetic_head_has_the_released_keys_and_scores_by_hand(compose, tiny_clip, tmp_path):
    from htgrpo.rewards.preference import AestheticMLP

    torch.manual_seed(1)
    head = AestheticMLP(16)
    assert list(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    torch.save(head.state_dict(), tmp_path / "aesthetic-model.pth")
    cfg = compose("fit", ["experiment=shapes_ht", "reward=aesthetic", f"reward.clip_model={tiny_clip}",
                          f"reward.head={tmp_path}", "reward.device=cpu"])
    reward = instantiate_node(cfg, "reward")
    images = _images(2, size=32)
    _, _, emb = _clip_reference(tiny_clip, images, ["a", "a"])  # forward's image_embeds are L2-normalised
    x = emb
    sd = head.state_dict()
    for i in (0, 2, 4, 6, 7):  # linear layers only: no activations in the released head, dropout is off in eval
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert torch.allclose(reward(images, [None, None]), x.squeeze(-1), atol=1e-5)
    torch.save(AestheticMLP(8).state_dict(), tmp_path / "wrong.pth")
    cfg = compose("fit", ["experiment=shapes_ht", "reward=aesthetic", f"reward.clip_model={tiny_clip}",
                          f"reward.head={tmp_path / 'wrong.pth'}", "reward.device=cpu"])
    with pytest.raises(ConfigError, match=r"reward\.head: .*16-d"):
        instantiate_node(cfg, "reward")


@pytest.mark.parametrize("name, key, repo", [
    ("clip_score", "reward.model", "openai/clip-vit-large-patch14"),
    ("pickscore", "reward.model", "yuvalkirstain/PickScore_v1"),
    ("aesthetic", "reward.clip_model", "openai/clip-vit-large-patch14"),
    ("imagereward", "reward.checkpoint", "THUDM/ImageReward"),
    ("hpsv2", "reward.checkpoint", "xswu/HPSv2"),
])
def test_missing_weights_name_the_key_the_repo_and_how_to_download(compose, name, key, repo, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    cfg = compose("fit", ["experiment=shapes_ht", f"reward={name}", "reward.device=cpu"])
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "reward")
    msg = str(err.value)
    assert msg.startswith(key) and repo in msg and "huggingface-cli download" in msg


def test_hpsv2_loads_the_released_checkpoint_layout_through_open_clip(compose, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    import json

    from PIL import Image as PILImage

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "htgrpo-tiny-hps.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "htgrpo-tiny-hps.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("htgrpo-tiny-hps", pretrained=None)
    model.eval()
    (tmp_path / "hps").mkdir()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")  # released layout
    cfg = compose("fit", ["experiment=shapes_ht", "reward=hpsv2", f"reward.checkpoint={tmp_path / 'hps'}",
                          "reward.arch=htgrpo-tiny-hps", f"reward.model_config={tmp_path / 'htgrpo-tiny-hps.json'}",
                          "reward.device=cpu"])
    reward = instantiate_node(cfg, "reward")
    images = _images(2, size=48)
    prompts = ["a photo of a red circle", "two dogs"]
    with torch.no_grad():  # HPSv2's own recipe: forward, then diag(image_features @ text_features.T)
        pixels = torch.stack([preprocess(PILImage.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
        image_features, text_features, _ = model(pixels, open_clip.get_tokenizer("htgrpo-tiny-hps")(prompts))
        expected = (image_features @ text_features.T).diagonal()
    assert torch.allclose(reward(images, prompts), expected, atol=1e-5)
    cfg = compose("fit", ["experiment=shapes_ht", "reward=hpsv2", f"reward.checkpoint={tmp_path}", "reward.device=cpu",
                          "reward.arch=htgrpo-tiny-hps"])
    with pytest.raises(ConfigError, match=r"reward\.checkpoint: .*HPS_v2\.1_compressed\.pt"):
        instantiate_node(cfg, "reward")


# ---- ImageReward: the released checkpoint layout, rebuilt on transformers BLIP ----------------------------------
MED_TEXT_KEYS_LAYER0 = [  # BLIP's med.py BertLayer parameter names (ImageReward.pt: blip.text_encoder.encoder.layer.0.*)
    f"{block}.{p}" for block in ("attention.self.query", "attention.self.key", "attention.self.value",
                                 "attention.output.dense", "attention.output.LayerNorm",
                                 "crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                                 "crossattention.output.dense", "crossattention.output.LayerNorm",
                                 "intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias")]


def test_imagereward_loads_the_released_layout_and_matches_an_independent_forward(compose, tmp_path):
    import functools
    import json

    import timm
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BlipTextModel, PreTrainedTokenizerFast

    from htgrpo.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, text_config_from
    from htgrpo.rewards.preference import AestheticMLP

    torch.manual_seed(0)
    # BLIP's ViT is timm's VisionTransformer layout (cls_token, pos_embed, patch_embed.proj, blocks.i.*, norm)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0, global_pool="", qkv_bias=True,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    med = {"vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
           "encoder_width": 64, "add_cross_attention": True}
    text = BlipTextModel(text_config_from(med, 64), add_pooling_layer=False).eval()
    assert [k[len("encoder.layer.0."):] for k in text.state_dict() if k.startswith("encoder.layer.0.")] == MED_TEXT_KEYS_LAYER0
    head = AestheticMLP(32).eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # a buffer med.py saves
    state["blip.vision_proj.weight"] = torch.zeros(8, 64)                        # unused by the score
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    folder = tmp_path / "ImageReward"
    folder.mkdir()
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "red", "circle", "dog", "two", "blue"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(tmp_path / "tok")

    cfg = compose("fit", ["experiment=shapes_ht", "reward=imagereward", f"reward.checkpoint={folder}",
                          f"reward.tokenizer={tmp_path / 'tok'}", "reward.device=cpu"])
    reward = instantiate_node(cfg, "reward")
    images = _images(2, size=48)
    prompts = ["a photo of a red circle", "two blue dog"]
    got = reward(images, prompts)
    # independent forward: timm ViT features -> BLIP text encoder cross-attending -> [CLS] -> head, normalised
    pixels = reward.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        image_embeds = vit.forward_features(pixels)
        assert torch.allclose(reward.model.vision(pixel_values=pixels).last_hidden_state, image_embeds, atol=1e-5)
        ids = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")(prompts, padding="max_length", max_length=35,
                                                                         return_tensors="pt")
        hidden = text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], encoder_hidden_states=image_embeds,
                      encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        expected = (head(hidden).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert torch.allclose(got, expected, atol=1e-5)
    # the prompt matters (cross-attention path is live)
    assert not torch.allclose(reward(images, ["a", "a"]), got)


def test_auto_device_rewards_follow_the_training_device_and_explicit_ones_stay():
    moved = []

    class Model(Reward):
        def score(self, images, records):
            return RewardOutput(torch.zeros(len(records)))

        def _move(self, device):
            moved.append((self.device_setting, str(device)))

    auto, pinned = Model(device="auto"), Model(device="cpu")
    assert auto.device_setting == "auto" and pinned.device_setting == "cpu"
    mix = MixReward({"a": {"weight": 1.0, "reward": auto}, "b": {"weight": 1.0, "reward": pinned}})
    mix.follow("cpu")                     # a CPU run: nothing moves
    assert moved == []
    mix.follow(torch.device("meta"))      # any accelerator (meta stands in for cuda:N): only `auto` follows
    assert moved == [("auto", "meta")] and auto.device == torch.device("meta") and pinned.device == torch.device("cpu")
