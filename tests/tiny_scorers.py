"""Tiny random-weight scorer models saved in their real release formats (config.json + safetensors + processor and
tokenizer files built offline), for the GenEval / DPG-Bench evaluator tests. Nothing here reaches a hub."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_level_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def save_tiny_mask2former(folder: Path, id2label: dict[int, str], favour: str | None = None, num_queries: int = 12,
                          seed: int = 0) -> Path:
    """A 1-block-per-stage Swin + Mask2Former instance model (classes ``id2label``) with its image processor.

    ``favour``: a class name every query predicts with probability ~0.97 (class head weight 0, bias 8 for it), so
    a detection of that class scores ~0.97 x mask score (> 0.3) on any image and other classes score ~0."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = dict(id2label)
    num_labels = len(labels)
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, id2label=labels,
                            label2id={v: k for k, v in labels.items()}, hidden_dim=32, num_queries=num_queries,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                            mask_feature_size=32, feature_size=32, encoder_feedforward_dim=32, common_stride=4)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if favour is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[{v: k for k, v in labels.items()}[favour]] = 8.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A 1-layer CLIP (text + vision) with a byte-level BPE CLIP tokenizer and a CLIP image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    chars = _byte_level_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    model = CLIPModel(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


BLIP_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "is", "there", "a", "the", "dog",
              "cat", "red", "blue", "?")


def save_tiny_blip_vqa(folder: Path, answer: str | None = None, seed: int = 0) -> Path:
    """A 1-layer ``BlipForQuestionAnswering`` with a BERT word-piece tokenizer (``BLIP_WORDS``) and a BLIP processor.

    ``answer``: ``"yes"`` / ``"no"`` makes the answer decoder's first token that word whatever the input (output
    bias +20), so its answers and ``p(yes)`` are known."""
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(BLIP_WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=16, bos_token_id=vocab["[DEC]"],
                         sep_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"], max_position_embeddings=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = BlipForQuestionAnswering(cfg).eval()
    if answer is not None:
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[vocab[answer]] += 20.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


VLM_WORDS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "yes", "no", "Yes", "No", "USER:", "ASSISTANT:", "is",
             "there", "a", "the", "dog", "cat", "red", "?", "Answer", "with", "or", ".")
CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_llava(folder: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """A 1-layer LLaVA (CLIP vision tower + Llama) with a word-level ``tokenizers`` tokenizer and a LLaVA processor
    (optionally with a chat template): a vision-language model ``AutoModelForImageTextToText`` loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(VLM_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=4,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                  crop_size={"height": 16, "width": 16}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE if chat_template else None)
    processor.save_pretrained(folder)
    return folder
