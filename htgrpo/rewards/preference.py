"""Preference rewards and metrics on CLIP features, each through transformers' ``CLIPModel``:

* ``clip_score`` — CLIPScore (Hessel et al. 2021; torchmetrics' ``CLIPScore`` convention)::

      clip_score(x, c) = scale * max(cos(E_img(x), E_txt(c)), 0)        scale = 100 (torchmetrics; Hessel: 2.5)

  default model ``openai/clip-vit-large-patch14``.
* ``pickscore`` — PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences::

      pickscore(x, c) = exp(logit_scale) * cos(E_img(x), E_txt(c))       (~ 20..23 for typical images)

  model ``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
* ``aesthetic`` — LAION's improved aesthetic predictor (C. Schuhmann, ``sac+logos+ava1-l14-linearMSE``)::

      aesthetic(x) = MLP(E_img(x) / ||E_img(x)||)       (E_img: CLIP ViT-L/14 image embedding, 768-d; ~1..10)

  the MLP is :class:`AestheticMLP` with the released key names (``layers.{0,2,4,6,7}``); the weights file is
  ``aesthetic-model.pth`` of ``trl-lib/ddpo-aesthetic-predictor`` (the same state dict; DDPO's reward).

Models are loaded with ``from_pretrained`` from a hub id or a local ``save_pretrained`` folder; offline, a missing
model fails at start-up naming the config key, the repo id and how to download it. The models are frozen, in eval
mode, held by the reward (not an ``nn.Module``), so training never checkpoints or wraps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from htgrpo.config import ConfigError, require
from htgrpo.data.records import record_prompt
from htgrpo.rewards.base import Reward, RewardOutput, check_images, freeze

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILE = "aesthetic-model.pth"


def _how_to_get(repo: str, key: str) -> str:
    return (f"download it once with `huggingface-cli download {repo}` (needs network; then it is found in the HF cache, "
            f"also with HF_HUB_OFFLINE=1), or set {key} to a local folder")


def _features(out: Any) -> Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is the projection (5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPFeatures:
    """A frozen transformers CLIP model with its tokenizer and image processor.

    Args:
        model: hub id or local folder of a ``CLIPModel`` (``config.json`` + weights).
        processor: where the tokenizer / image processor live (default: ``model``).
        key: the config key of ``model`` (named in errors).
        device, dtype: where and in which dtype the model runs.
    """

    def __init__(self, model: str, processor: str | None, key: str, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        proc = processor or model
        try:
            self.model = freeze(CLIPModel.from_pretrained(model, dtype=dtype).to(device))
        except (OSError, ValueError) as err:
            raise ConfigError(key, f"cannot load the CLIP model {model!r} ({type(err).__name__}: {str(err)[:300]}); "
                                   f"{_how_to_get(model, key)}") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(proc)
            self.image_processor = AutoImageProcessor.from_pretrained(proc)
        except (OSError, ValueError) as err:
            pkey = key if processor is None else "processor"
            raise ConfigError(pkey, f"cannot load the tokenizer / image processor {proc!r} "
                                    f"({type(err).__name__}: {str(err)[:300]}); {_how_to_get(proc, pkey)}") from None
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``(B, D)`` float32 of uint8 ``(B, 3, H, W)`` images."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        emb = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(B, D)`` float32 (texts truncated to the model's context length)."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        emb = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                     attention_mask=tok["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)


class CLIPScoreReward(Reward):
    """``clip_score``: ``scale * max(cos(image, prompt), 0)`` on CLIP embeddings. Component ``clip/cosine``.

    Args:
        model: CLIP model (hub id or local folder).
        scale: 100 (torchmetrics' CLIPScore) or 2.5 (Hessel et al.'s w).
        device, dtype: see :class:`~htgrpo.rewards.base.Reward`.
    """

    name = "clip_score"

    def __init__(self, model: str = CLIP_L14, scale: float = 100.0, device: str = "auto", dtype: str = "float32") -> None:
        super().__init__(device, dtype)
        require(float(scale) > 0, "scale", f"must be > 0, got {scale}")
        self.scale = float(scale)
        self.clip = CLIPFeatures(str(model), None, "model", self.device, self.dtype)

    def _move(self, device: torch.device) -> None:
        self.clip.to(device)

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images)
        cos = (self.clip.image_embeds(batch) * self.clip.text_embeds([record_prompt(r) for r in records])).sum(-1).cpu()
        return RewardOutput(self.scale * cos.clamp(min=0), {"clip/cosine": cos})


class PickScoreReward(Reward):
    """``pickscore``: ``exp(logit_scale) * cos(image, prompt)`` with the PickScore CLIP-H. Component ``pickscore/cosine``.

    Args:
        model: the PickScore model (hub id or local folder).
        processor: tokenizer + image processor (PickScore ships none: LAION's CLIP-H one).
        device, dtype: see :class:`~htgrpo.rewards.base.Reward`.
    """

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, device: str = "auto",
                 dtype: str = "float32") -> None:
        super().__init__(device, dtype)
        self.clip = CLIPFeatures(str(model), str(processor) if processor else None, "model", self.device, self.dtype)

    def _move(self, device: torch.device) -> None:
        self.clip.to(device)

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images)
        cos = (self.clip.image_embeds(batch) * self.clip.text_embeds([record_prompt(r) for r in records])).sum(-1).cpu()
        scale = float(self.clip.model.logit_scale.exp())
        return RewardOutput(scale * cos, {"pickscore/cosine": cos})


class AestheticMLP(nn.Module):
    """LAION's aesthetic head: five linear layers with dropout between the first four (no activations), the released
    ``nn.Sequential`` layout so its state dict (``layers.0/2/4/6/7.{weight,bias}``) loads unchanged."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


def _resolve_file(source: str, filename: str, key: str) -> Path:
    """A weights file: ``source`` itself (a file), ``source/filename`` (a folder), or ``filename`` of hub repo ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        require((path / filename).is_file(), key, f"{path} has no {filename}")
        return path / filename
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, filename))
    except Exception as err:  # noqa: BLE001 - offline / not found / bad id all mean "get the file"
        raise ConfigError(key, f"cannot get {filename} of {source!r} ({type(err).__name__}); "
                               f"{_how_to_get(source, key)} (a .pth file or a folder holding {filename})") from None


class AestheticReward(Reward):
    """``aesthetic``: LAION's improved aesthetic predictor on CLIP ViT-L/14 image embeddings (prompt-free).

    Args:
        clip_model: the CLIP model whose image embeddings the head reads (released head: ViT-L/14, 768-d).
        head: the head's weights: a ``.pth`` file, a folder holding ``head_file``, or a hub repo id.
        head_file: file name of the head in that folder / repo.
        device, dtype: see :class:`~htgrpo.rewards.base.Reward`.
    """

    name = "aesthetic"

    def __init__(self, clip_model: str = CLIP_L14, head: str = AESTHETIC_REPO, head_file: str = AESTHETIC_FILE,
                 device: str = "auto", dtype: str = "float32") -> None:
        super().__init__(device, dtype)
        self.clip = CLIPFeatures(str(clip_model), None, "clip_model", self.device, self.dtype)
        dim = int(self.clip.model.config.projection_dim)
        path = _resolve_file(str(head), str(head_file), "head")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.head = AestheticMLP(dim)
        try:
            self.head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError("head", f"{path} is not an aesthetic head for {dim}-d CLIP embeddings: {err}") from None
        self.head = freeze(self.head.to(self.device))

    def _move(self, device: torch.device) -> None:
        self.clip.to(device)
        self.head.to(device)

    @torch.no_grad()
    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        emb = self.clip.image_embeds(check_images(images))
        return RewardOutput(self.head(emb.to(self.device)).squeeze(-1).float().cpu())


HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2Reward(Reward):
    """``hpsv2``: Human Preference Score v2 (Wu et al. 2023) through open_clip (optional extra ``htgrpo[rewards]``)::

        hpsv2(x, c) = <E_img(x), E_txt(c)> / (||E_img(x)|| ||E_txt(c)||)     (no logit scale; v2.1 ~0.2..0.35)

    The model is open_clip's ``ViT-H-14`` with the HPS checkpoint's ``state_dict`` loaded over it (the released
    ``HPS_v2*_compressed.pt`` of ``xswu/HPSv2``), the eval transform of that architecture, and its tokenizer.

    Args:
        version: ``v2.1`` (default) or ``v2.0``: picks the checkpoint file.
        checkpoint: hub repo id, a folder holding the checkpoint file, or the ``.pt`` file itself.
        arch: open_clip architecture name (``ViT-H-14``).
        model_config: optional JSON file of an open_clip model config to register first (custom architectures).
        device, dtype: see :class:`~htgrpo.rewards.base.Reward`.
    """

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", checkpoint: str = HPS_REPO, arch: str = "ViT-H-14",
                 model_config: str | None = None, device: str = "auto", dtype: str = "float32") -> None:
        super().__init__(device, dtype)
        from htgrpo.config import require_choice

        require_choice(version, HPS_FILES, "version")
        try:
            import open_clip
        except ImportError:
            raise ConfigError("_target_", "hpsv2 needs open_clip: pip install 'htgrpo[rewards]' "
                                          "(or open_clip_torch), or serve it with htgrpo.serve elsewhere") from None
        if model_config:
            path = Path(str(model_config)).expanduser()
            require(path.is_file(), "model_config", f"{path} is not a file")
            open_clip.add_model_config(path)
        ckpt = _resolve_file(str(checkpoint), HPS_FILES[version], "checkpoint")  # first: fail before building ViT-H
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(str(arch), pretrained=None)
            self.tokenizer = open_clip.get_tokenizer(str(arch))
        except RuntimeError as err:
            raise ConfigError("arch", f"open_clip cannot build {arch!r}: {err}") from None
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError("checkpoint", f"{ckpt} does not fit open_clip {arch}: {str(err)[:500]}") from None
        self.model = freeze(model.to(self.device, self.dtype))

    def _move(self, device: torch.device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        from PIL import Image

        batch = check_images(images)
        pixels = torch.stack([self.preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in batch])
        text = self.tokenizer([record_prompt(r) for r in records])
        img = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True).float()
        txt = self.model.encode_text(text.to(self.device), normalize=True).float()
        return RewardOutput((img * txt).sum(-1).cpu())
