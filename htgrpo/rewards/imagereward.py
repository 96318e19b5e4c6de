"""``imagereward``: ImageReward-v1.0 (Xu et al. 2023, THUDM/ImageReward) on transformers' BLIP modules.

The authors' package (``image-reward``) pins ``timm==0.6.13`` and cannot be installed next to our pins, so the model
is rebuilt here from transformers parts and loads the released ``ImageReward.pt`` unchanged:

* image tower: BLIP's ViT (``blip.visual_encoder``; ViT-L/16 at 224 px) -> transformers ``BlipVisionModel``;
* text tower: BLIP's BERT with cross-attention to the image tokens (``blip.text_encoder``, ``med_config.json``)
  -> transformers ``BlipTextModel`` (same parameter names);
* head: ``mlp.layers`` — five linear layers, no activations (the LAION aesthetic layout, 768 -> 1).

Rule, for image ``x`` and prompt ``c`` (``ImageReward.score``)::

    h = BERT_xattn(tokens(c) padded to 35, cross-attending to ViT(x))[:, 0]       ([CLS] position)
    imagereward(x, c) = (MLP(h) - 0.16717362830052426) / 1.0333394966054072

Pre-processing as released: PIL bicubic resize of the short side to 224, centre crop 224, CLIP mean/std.
Tokenizer: ``bert-base-uncased`` (BLIP adds ``[DEC]`` and ``[ENC]``, which plain prompts never produce).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from htgrpo.config import ConfigError, require
from htgrpo.data.records import record_prompt
from htgrpo.rewards.base import Reward, RewardOutput, check_images, freeze
from htgrpo.rewards.preference import AestheticMLP, _how_to_get, _resolve_file

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PROMPT_TOKENS = 35  # ImageReward.score: padding="max_length", max_length=35


def convert_vision_key(key: str) -> str:
    """BLIP ViT name (``blip.visual_encoder.`` stripped) -> ``BlipVisionModel`` name.

    ``cls_token`` -> ``embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
    ``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.i.{norm1,norm2}`` ->
    ``encoder.layers.i.{layer_norm1,layer_norm2}``, ``blocks.i.attn.{qkv,proj}`` -> ``...self_attn.{qkv,projection}``,
    ``blocks.i.mlp.*`` -> ``encoder.layers.i.mlp.*``, ``norm`` -> ``post_layernorm``.
    """
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
    if key in fixed:
        return fixed[key]
    if key.startswith("patch_embed.proj."):
        return "embeddings.patch_embedding." + key[len("patch_embed.proj."):]
    if key.startswith("norm."):
        return "post_layernorm." + key[len("norm."):]
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if m is None:
        raise KeyError(key)
    rest = m.group(2)
    for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                     ("attn.proj.", "self_attn.projection."), ("mlp.", "mlp.")):
        if rest.startswith(old):
            return f"encoder.layers.{m.group(1)}.{new}{rest[len(old):]}"
    raise KeyError(key)


def split_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Released ``ImageReward.pt`` state dict -> (vision, text, head) state dicts in our modules' names.

    Keys of BLIP parts ImageReward does not use for scoring (``blip.vision_proj``, ``blip.text_proj`` ...) and the
    text tower's ``position_ids`` buffer are dropped.
    """
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[convert_vision_key(key[len("blip.visual_encoder."):])] = value
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if not name.endswith("position_ids"):
                text[name] = value
        elif key.startswith("mlp."):
            head[key[len("mlp."):]] = value
    return vision, text, head


def vision_config_from(vision: dict[str, Tensor]):
    """The ``BlipVisionConfig`` of a converted BLIP ViT (sizes read from the weights; 64-d heads, LayerNorm eps 1e-6)."""
    from transformers import BlipVisionConfig

    hidden = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    num_patches = int(vision["embeddings.position_embedding"].shape[1]) - 1
    side = int(round(num_patches ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(hidden_size=hidden, intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), image_size=side * patch,
                            patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")


def text_config_from(med_config: dict[str, Any], encoder_hidden_size: int):
    """The ``BlipTextConfig`` of BLIP's text encoder described by ``med_config.json``."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]), hidden_size=int(med_config["hidden_size"]),
        encoder_hidden_size=int(encoder_hidden_size), intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]), num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config["max_position_embeddings"]),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)), hidden_act=str(med_config.get("hidden_act", "gelu")),
        pad_token_id=int(med_config.get("pad_token_id", 0)), is_decoder=True)  # is_decoder: builds the cross-attention


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + linear head; ``forward`` returns the normalised ImageReward ``(B,)``."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticMLP(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state[:, 0]
        return (self.head(hidden.float()).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImageRewardReward(Reward):
    """``imagereward``: ImageReward-v1.0 from the released checkpoint (see the module docstring).

    Args:
        checkpoint: hub repo id (``THUDM/ImageReward``), a folder holding ``ImageReward.pt`` and ``med_config.json``,
            or the ``.pt`` file (then ``med_config.json`` is looked for beside it).
        tokenizer: the BERT tokenizer (hub id or folder).
        device, dtype: see :class:`~htgrpo.rewards.base.Reward`.
    """

    name = "imagereward"

    def __init__(self, checkpoint: str = IMAGEREWARD_REPO, tokenizer: str = "google-bert/bert-base-uncased",
                 device: str = "auto", dtype: str = "float32") -> None:
        super().__init__(device, dtype)
        from transformers import AutoTokenizer

        source = str(checkpoint)
        path = Path(source).expanduser()
        ckpt = _resolve_file(source, "ImageReward.pt", "checkpoint")
        med_source = str(path.parent) if path.is_file() else source
        med = json.loads(_resolve_file(med_source, "med_config.json", "checkpoint").read_text())
        vision, text, head = split_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True))
        require(bool(vision) and bool(text) and bool(head), "checkpoint",
                f"{ckpt} is not an ImageReward checkpoint (no blip.visual_encoder / blip.text_encoder / mlp weights)")
        vcfg = vision_config_from(vision)
        model = ImageRewardModel(vcfg, text_config_from(med, vcfg.hidden_size))
        for part, weights in ((model.vision, vision), (model.text, text), (model.head, head)):
            try:
                part.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise ConfigError("checkpoint", f"{ckpt} does not match ImageReward's layout: {str(err)[:500]}") from None
        self.model = freeze(model.to(self.device, self.dtype))
        self.model.head.float()  # the head and the normalisation run in float32, as released (.float() before mlp)
        self.image_size = int(vcfg.image_size)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as err:
            raise ConfigError("tokenizer", f"cannot load the tokenizer {tokenizer!r} ({type(err).__name__}); "
                                           f"{_how_to_get(str(tokenizer), 'tokenizer')}") from None

    def _move(self, device: torch.device) -> None:
        self.model.to(device)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``(B,3,H,W)`` -> ``(B,3,S,S)``: PIL bicubic resize (short side S), centre crop S, CLIP mean/std."""
        from PIL import Image
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        tf = Compose([Resize(self.image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(self.image_size),
                      ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])
        return torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])

    @torch.no_grad()
    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images)
        tok = self.tokenizer([record_prompt(r) for r in records], padding="max_length", truncation=True,
                             max_length=MAX_PROMPT_TOKENS, return_tensors="pt")
        dev = self.device
        pixels = self.preprocess(batch).to(dev, self.dtype)
        return RewardOutput(self.model(pixels, tok["input_ids"].to(dev), tok["attention_mask"].to(dev)).float().cpu())
