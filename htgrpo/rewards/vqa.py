"""Visual-question-answering backends for DPG-Bench: answer yes/no questions about images.

One interface, :class:`VQABackend`:

* ``answer(images, questions) -> [str]``: the model's answer text, lower-cased and stripped. DPG-Bench counts a
  question as passed iff the answer is exactly ``"yes"`` (``compute_dpg_bench.py``: ``float(answer == 'yes')``).
* ``yes_probability(images, questions) -> (N,)``: a soft answer in [0, 1] (a dense reward).

Backends:

* :class:`BlipVQA` — transformers ``BlipForQuestionAnswering`` (``Salesforce/blip-vqa-base`` or
  ``Salesforce/blip-vqa-capfilt-large``): the answer is generated; ``yes_probability`` is
  ``softmax([l_yes, l_no])[0]`` over the answer decoder's first-token logits.
* :class:`YesNoLogitVQA` — any transformers vision-language model loadable with ``AutoModelForImageTextToText`` +
  ``AutoProcessor`` (Qwen2-VL, LLaVA, ...): the question goes in a prompt asking for yes/no, and the next-token logits
  of the "yes" tokens vs the "no" tokens give ``p(yes)``; ``answer`` is ``"yes"`` iff ``p(yes) > 0.5``.
* :class:`MPLUGVQA` — the official scorer, ModelScope's ``damo/mplug_visual-question-answering_coco_large_en``,
  through the ``modelscope`` package (optional; see its docstring).

Models load on first use (``load()``), are frozen and in eval mode, and are never registered in a LightningModule.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np
import torch

from htgrpo.config import ConfigError, require
from htgrpo.rewards._hf import load_pretrained
from htgrpo.rewards.base import DTYPES, freeze, resolve_device

DEFAULT_BLIP_VQA = "Salesforce/blip-vqa-base"
DEFAULT_MPLUG = "damo/mplug_visual-question-answering_coco_large_en"


def _pil(images: Sequence[Any]) -> list[Any]:
    """uint8 ``(3, H, W)`` tensors / ``(H, W, 3)`` arrays / PIL images -> RGB PIL images."""
    from PIL import Image

    out = []
    done: dict[int, Any] = {}  # the same image object asked several questions is converted once
    for im in images:
        if id(im) not in done:
            if isinstance(im, Image.Image):
                done[id(im)] = im.convert("RGB")
            else:
                arr = im.detach().cpu().numpy() if isinstance(im, torch.Tensor) else np.asarray(im)
                if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
                    arr = arr.transpose(1, 2, 0)
                done[id(im)] = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))).convert("RGB")
        out.append(done[id(im)])
    return out


class VQABackend(abc.ABC):
    """Answers questions about images, batched (``batch_size`` (image, question) pairs per forward pass).

    Args:
        model: Hub repo id or local folder.
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``.
        dtype: ``float32`` | ``float16`` | ``bfloat16``.
        batch_size: (image, question) pairs per forward pass.
        config_key: the key naming ``model`` in errors (``model`` -> e.g. ``benchmark.scorer.vqa.model``).
    """

    name = "vqa"

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", batch_size: int = 16,
                 config_key: str = "model") -> None:
        require(model not in (None, ""), config_key, "is not set: a Hub repo id or a local model folder")
        require(dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        require(int(batch_size) >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        self.model_name = str(model)
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.batch_size = int(batch_size)
        self.config_key = config_key
        self._loaded = False

    def load(self) -> "VQABackend":
        """Load the model now (``ConfigError`` naming the key and repo id when the weights are missing)."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    @abc.abstractmethod
    def _load(self) -> None: ...

    def _load_transformers_model(self, model_cls: Any, what: str) -> Any:
        """Load ``self.model_name``'s processor (``AutoProcessor``) and ``model_cls`` weights (frozen, on the device and
        dtype) into ``self.processor`` / ``self.model``; missing weights raise a ConfigError naming the key (``what``
        says which model). Returns the processor's tokenizer."""
        from transformers import AutoProcessor

        self.processor = load_pretrained(AutoProcessor.from_pretrained, self.model_name, self.config_key, what)
        net = load_pretrained(model_cls.from_pretrained, self.model_name, self.config_key, what)
        self.model = freeze(net).to(self.device, self.dtype)
        return self.processor.tokenizer

    @abc.abstractmethod
    def _answer_batch(self, images: list[Any], questions: list[str]) -> list[str]: ...

    def _yes_probability_batch(self, images: list[Any], questions: list[str]) -> torch.Tensor:
        return torch.tensor([1.0 if a == "yes" else 0.0 for a in self._answer_batch(images, questions)])

    def to(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self._loaded:
            self.model.to(self.device)  # type: ignore[attr-defined]

    def _batches(self, images: Sequence[Any], questions: Sequence[str]):
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        self.load()
        pil = _pil(images)
        for start in range(0, len(pil), self.batch_size):
            yield pil[start:start + self.batch_size], list(questions[start:start + self.batch_size])

    @torch.no_grad()
    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        """Answer text per (image, question) pair, lower-cased and stripped."""
        out: list[str] = []
        for ims, qs in self._batches(images, questions):
            out += [a.strip().lower() for a in self._answer_batch(ims, qs)]
        return out

    @torch.no_grad()
    def yes_probability(self, images: Sequence[Any], questions: Sequence[str]) -> torch.Tensor:
        """``p(yes)`` per pair, float32 in [0, 1]."""
        parts = [self._yes_probability_batch(ims, qs).float().cpu() for ims, qs in self._batches(images, questions)]
        return torch.cat(parts) if parts else torch.zeros(0)


def _single_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Vocabulary ids of the words that are one token each (tried as given, which includes space-prefixed forms)."""
    ids: list[int] = []
    for w in words:
        enc = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and enc[0] not in ids and enc[0] != getattr(tokenizer, "unk_token_id", None):
            ids.append(int(enc[0]))
    return ids


class BlipVQA(VQABackend):
    """transformers ``BlipForQuestionAnswering`` (default ``Salesforce/blip-vqa-base``).

    Args:
        max_new_tokens: answer length limit for ``generate`` (DPG answers are one word).
        (others: :class:`VQABackend`)
    """

    name = "blip_vqa"

    def __init__(self, model: str = DEFAULT_BLIP_VQA, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 16, max_new_tokens: int = 10, config_key: str = "model") -> None:
        super().__init__(model, device, dtype, batch_size, config_key)
        require(int(max_new_tokens) >= 1, "max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)

    def _load(self) -> None:
        from transformers import BlipForQuestionAnswering

        tok = self._load_transformers_model(BlipForQuestionAnswering, "the DPG-Bench VQA model (BLIP VQA)")
        self.yes_ids = _single_token_ids(tok, ["yes"])
        self.no_ids = _single_token_ids(tok, ["no"])
        if not self.yes_ids or not self.no_ids:
            raise ConfigError(self.config_key, f"the tokenizer of {self.model_name} has no single 'yes'/'no' token")

    def _inputs(self, images: list[Any], questions: list[str]) -> Any:
        enc = self.processor(images=images, text=questions, padding=True, return_tensors="pt")
        enc = enc.to(self.device)
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return enc

    def _answer_batch(self, images: list[Any], questions: list[str]) -> list[str]:
        enc = self._inputs(images, questions)
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def _yes_probability_batch(self, images: list[Any], questions: list[str]) -> torch.Tensor:
        # The first answer token, exactly as generate() computes it: image -> question encoder -> decoder step 1.
        enc = self._inputs(images, questions)
        m = self.model
        image_embeds = m.vision_model(pixel_values=enc["pixel_values"])[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        question = m.text_encoder(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                  return_dict=False)[0]
        question_mask = torch.ones(question.shape[:-1], dtype=torch.long, device=question.device)
        bos = torch.full((question.shape[0], 1), m.decoder_start_token_id, device=question.device)
        logits = m.text_decoder(input_ids=bos, encoder_hidden_states=question, encoder_attention_mask=question_mask,
                                return_dict=True).logits[:, -1].float()
        return yes_no_probability(logits, self.yes_ids, self.no_ids)


def yes_no_probability(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """``p(yes) = sum_{y in yes} e^{l_y} / (sum_{y in yes} e^{l_y} + sum_{n in no} e^{l_n})`` per row of ``logits``
    ``(N, V)``: the softmax restricted to the yes/no tokens. E.g. one yes and one no token with logits 2 and 0:
    ``e^2 / (e^2 + 1) = 0.8808``."""
    yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
    no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    return torch.sigmoid(yes - no)


class YesNoLogitVQA(VQABackend):
    """A transformers vision-language model scored by its yes/no next-token logits.

    The prompt is the processor's chat template (one user turn: the image, then ``prompt`` with the question)
    when it has one, else ``fallback_template``. ``p(yes)`` = :func:`yes_no_probability` over the next-token
    logits with the single-token forms of ``yes_words`` / ``no_words``; ``answer`` = ``"yes"`` iff ``p(yes) > 0.5``.

    Args:
        model: e.g. ``Qwen/Qwen2-VL-2B-Instruct`` or a ``save_pretrained`` folder (``AutoModelForImageTextToText``).
        prompt: the user text; ``{question}`` is replaced by the DPG question.
        fallback_template: full prompt when the processor has no chat template (``{question}``; must contain the
            processor's image token where the model expects it, e.g. ``<image>`` for LLaVA).
        yes_words / no_words: surface forms tried as single tokens.
    """

    name = "yes_no_logits"

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", batch_size: int = 8,
                 prompt: str = "{question} Answer with yes or no.",
                 fallback_template: str = "<image>\nUSER: {question} Answer with yes or no.\nASSISTANT:",
                 yes_words: Sequence[str] = ("yes", "Yes", " yes", " Yes", "YES"),
                 no_words: Sequence[str] = ("no", "No", " no", " No", "NO"), config_key: str = "model") -> None:
        super().__init__(model, device, dtype, batch_size, config_key)
        require("{question}" in prompt, "prompt", f"must contain '{{question}}', got {prompt!r}")
        require("{question}" in fallback_template, "fallback_template", "must contain '{question}'")
        self.prompt, self.fallback_template = prompt, fallback_template
        self.yes_words, self.no_words = tuple(yes_words), tuple(no_words)

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText

        tok = self._load_transformers_model(
            AutoModelForImageTextToText, "the DPG-Bench VQA model (a vision-language model scored by yes/no logits)")
        # Right padding: real tokens keep their positions (no position-id shift, whatever the model's rope
        # scheme), and a causal model's real tokens never attend to the pads after them.
        tok.padding_side = "right"
        self.yes_ids = _single_token_ids(tok, self.yes_words)
        self.no_ids = _single_token_ids(tok, self.no_words)
        if not self.yes_ids or not self.no_ids:
            raise ConfigError(self.config_key, f"the tokenizer of {self.model_name} has no single-token yes/no "
                              f"among {self.yes_words} / {self.no_words}")

    def _text(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": self.prompt.format(question=question)}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.fallback_template.format(question=question)

    def _yes_probability_batch(self, images: list[Any], questions: list[str]) -> torch.Tensor:
        texts = [self._text(q) for q in questions]
        enc = self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        logits = self.model(**enc).logits.float()
        mask = enc.get("attention_mask")
        if mask is None:
            last = logits[:, -1]
        else:  # the next-token logits sit at each row's last real token
            last_index = mask.long().sum(1) - 1
            last = logits[torch.arange(logits.shape[0], device=logits.device), last_index.to(logits.device)]
        return yes_no_probability(last, self.yes_ids, self.no_ids)

    def _answer_batch(self, images: list[Any], questions: list[str]) -> list[str]:
        return ["yes" if p > 0.5 else "no" for p in self._yes_probability_batch(images, questions).tolist()]


class MPLUGVQA(VQABackend):
    """The official DPG-Bench VQA model: ModelScope's mPLUG-large (``damo/mplug_visual-question-answering_coco_large_en``).

    Needs ``modelscope`` with its multi-modal dependencies (``pip install "modelscope[multi-modal]"``). That is not
    an extra of this project: checked on 2026-11-30, ``modelscope[multi-modal]`` does not install cleanly next to
    our pins (it pins ``fairseq-fixed==0.12.3.1``, built from source; the build did not finish in 4 minutes).
    Run the official scorer in its own environment, or behind the reward server (``reward=remote``); where
    ``modelscope`` does import, this backend runs it in-process. One question at a time, as the official
    ``MPLUG.vqa``.
    """

    name = "mplug"

    def __init__(self, model: str = DEFAULT_MPLUG, device: str = "auto", dtype: str = "float32", batch_size: int = 1,
                 config_key: str = "model") -> None:
        super().__init__(model, device, dtype, batch_size, config_key)

    def _load(self) -> None:
        try:
            from modelscope.pipelines import pipeline
            from modelscope.utils.constant import Tasks
        except Exception as err:  # noqa: BLE001 - any import failure means the optional stack is missing
            raise ConfigError(self.config_key, f"the mPLUG backend needs ModelScope ({type(err).__name__}: {err}); "
                              "install `modelscope[multi-modal]` (best in a separate environment, served through "
                              "`htgrpo.serve`), or use htgrpo.rewards.vqa.BlipVQA / YesNoLogitVQA") from None
        device = "gpu" if self.device.type == "cuda" else "cpu"
        self.pipeline = pipeline(Tasks.visual_question_answering, model=self.model_name, device=device)
        self.model = getattr(self.pipeline, "model", None)

    def to(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def _answer_batch(self, images: list[Any], questions: list[str]) -> list[str]:
        return [str(self.pipeline({"image": im, "question": q})["text"]) for im, q in zip(images, questions)]
