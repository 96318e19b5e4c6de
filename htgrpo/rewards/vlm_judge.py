"""``reward=vlm_judge``: a vision-language model judges each image through any OpenAI-compatible chat-completions
endpoint (vLLM, SGLang, TGI, or a hosted API), e.g. ``vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000`` and
``reward=vlm_judge reward.base_url=http://127.0.0.1:8000/v1 reward.model=Qwen/Qwen2.5-VL-7B-Instruct``.

One request per image, ``POST {base_url}/chat/completions``::

    {"model": MODEL,
     "messages": [{"role": "system", "content": SYSTEM_PROMPT},                 # only when system_prompt is set
                  {"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,<PNG>"}},
                      {"type": "text", "text": PROMPT_TEMPLATE with {prompt} -> the record's prompt}]}],
     "max_tokens": N, "temperature": T,
     "logprobs": true, "top_logprobs": K,                                       # parse = yes_no_logprob only
     ...extra_body}

with ``Authorization: Bearer $<api_key_env>`` when ``api_key_env`` names an environment variable (the key itself
is never a config value, so Hydra never writes it down).

How a reply becomes a reward in [0, 1] (``parse``):

* ``number`` — the first number in the reply (or group 1 of ``number_pattern`` when set, e.g. UnifiedReward's
  ``Final Score:\\s*([0-9.]+)``), mapped by :func:`scale_to_unit`: ``r = (x − lo) / (hi − lo)`` with
  ``score_range = [lo, hi]``. UnifiedReward's ``score / 5`` is ``score_range: [0, 5]``.
* ``yes_no_logprob`` — :func:`yes_probability`: ``P(yes) = Σ_yes e^lp / (Σ_yes e^lp + Σ_no e^lp)`` over the
  ``top_logprobs`` of the reply's first token (``choices[0].logprobs.content[0].top_logprobs``), tokens compared
  case-insensitively after stripping spaces. A server that returns no logprobs falls back to the reply text:
  a reply starting with yes -> 1, with no -> 0.
* ``json`` — the value at ``json_key`` (dots walk nested objects) of the first JSON object in the reply, mapped
  to [0, 1] by ``score_range`` like ``number``.

A reply that does not parse, or a value outside ``score_range``, scores NaN (advantage 0; the training modules
count it in ``train/nonfinite_rewards``), is logged as a warning with the reply, and is counted in
:attr:`VLMJudgeReward.num_unparseable` and the per-step component ``vlm_judge/unparseable``. A request that still
fails after ``retries`` (connection error, timeout, HTTP 429 / 5xx; waits ``retry_wait``, doubling) scores NaN too.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from htgrpo.config import ConfigError, require, require_choice
from htgrpo.data.records import record_prompt
from htgrpo.rewards.base import Reward, RewardOutput, check_images
from htgrpo.rewards.remote import TRANSIENT_STATUSES  # the statuses worth retrying: timeouts, rate limits, 5xx

log = logging.getLogger("htgrpo.rewards.vlm_judge")

PARSE_RULES: tuple[str, ...] = ("number", "yes_no_logprob", "json")
_FIRST_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---- parsing rules (pure functions) ---------------------------------------------------------------------------
def first_number(text: str, pattern: str | None = None) -> float | None:
    """The first number in ``text`` (``[-+]?digits[.digits][e±digits]``), or group 1 (else the whole match) of the
    first match of regex ``pattern``; None when there is none."""
    if pattern:
        match = re.search(pattern, text)
        if match is None:
            return None
        found = match.group(1) if match.groups() else match.group(0)
        number = _FIRST_NUMBER.search(found)
        return float(number.group(0)) if number else None
    match = _FIRST_NUMBER.search(text)
    return float(match.group(0)) if match else None


def scale_to_unit(value: float, low: float, high: float) -> float | None:
    """``(value − low) / (high − low)``: a judge's score on ``[low, high]`` as a reward in [0, 1]; None (unparseable)
    when ``value`` lies outside ``[low, high]`` or is not finite (a judge that answers off its scale is not trusted)."""
    if not math.isfinite(value) or value < low or value > high:
        return None
    return (value - low) / (high - low)


def yes_probability(top_logprobs: Sequence[tuple[str, float]], yes_tokens: Sequence[str],
                    no_tokens: Sequence[str]) -> float | None:
    """``P(yes) = Σ_{t∈yes} e^{lp_t} / (Σ_{t∈yes} e^{lp_t} + Σ_{t∈no} e^{lp_t})`` over the candidates of the first
    reply token; tokens match ``yes_tokens`` / ``no_tokens`` case-insensitively after stripping whitespace (``"Yes"``,
    ``" yes"``, ``"YES"`` are all yes). None when no yes/no token is among the candidates."""
    yes_set = {t.strip().lower() for t in yes_tokens}
    no_set = {t.strip().lower() for t in no_tokens}
    p_yes = p_no = 0.0
    for token, logprob in top_logprobs:
        key = str(token).strip().lower()
        if key in yes_set:
            p_yes += math.exp(float(logprob))
        elif key in no_set:
            p_no += math.exp(float(logprob))
    if p_yes + p_no <= 0.0:
        return None
    return p_yes / (p_yes + p_no)


def yes_no_from_text(text: str, yes_tokens: Sequence[str], no_tokens: Sequence[str]) -> float | None:
    """Fallback when a server returns no logprobs: 1 if the reply's first word is a yes token, 0 if a no token."""
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return None
    first = words[0].lower()
    if first in {t.strip().lower() for t in yes_tokens}:
        return 1.0
    if first in {t.strip().lower() for t in no_tokens}:
        return 0.0
    return None


def json_value(text: str, key: str) -> float | None:
    """The number at ``key`` (dotted path into nested objects) of the first JSON object in ``text`` that has it
    (a reply may wrap the object in prose or a ```json fence); None when there is none."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            value: Any = obj
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return first_number(value)
        start = text.find("{", start + 1)
    return None


# ---- wire format ----------------------------------------------------------------------------------------------
def png_data_url(image_chw: torch.Tensor, size: int | None = None) -> str:
    """uint8 ``(3, H, W)`` -> ``data:image/png;base64,...`` (resized to ``size × size`` with bicubic first when set)."""
    im = Image.fromarray(image_chw.permute(1, 2, 0).contiguous().numpy())
    if size:
        im = im.resize((int(size), int(size)), Image.BICUBIC)
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class JudgeReply:
    """What a chat-completions answer gives the parser: the reply text and, when returned, the first reply token's
    ``top_logprobs`` as ``(token, logprob)`` pairs."""

    text: str
    top_logprobs: tuple[tuple[str, float], ...] | None = None

    @staticmethod
    def from_response(body: Any) -> "JudgeReply":
        """Read ``choices[0].message.content`` and ``choices[0].logprobs.content[0].top_logprobs``.

        Raises:
            ValueError: the body is not a chat-completions response.
        """
        try:
            choice = body["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"not a chat-completions response: {str(body)[:200]}") from None
        text = content if isinstance(content, str) else ""
        top = None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list) and logprobs["content"]:
            first = logprobs["content"][0]
            candidates = first.get("top_logprobs") if isinstance(first, dict) else None
            if isinstance(candidates, list) and candidates:
                top = tuple((str(c.get("token", "")), float(c.get("logprob", -math.inf)))
                            for c in candidates if isinstance(c, dict))
            elif isinstance(first, dict) and "token" in first:  # top_logprobs missing: the sampled token alone
                top = ((str(first["token"]), float(first.get("logprob", 0.0))),)
        return JudgeReply(text, top)


class VLMJudgeReward(Reward):
    """A VLM judge over an OpenAI-compatible chat-completions endpoint (module docstring: request, parse rules).

    Args:
        base_url: the API root, ending in ``/v1``, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name (``vllm serve NAME`` / ``--served-model-name``).
        prompt_template: the text after the image; ``{prompt}`` is replaced by the record's prompt (no other braces
            are interpreted, so JSON examples may appear literally).
        system_prompt: optional system message.
        parse: ``number`` | ``yes_no_logprob`` | ``json``.
        score_range: ``[lo, hi]`` of the judge's scale (number / json): reward = (x − lo)/(hi − lo).
        number_pattern: regex whose group 1 holds the score (number; null = the first number of the reply).
        json_key: key (dotted path) of the score in the reply's JSON object (json).
        yes_tokens, no_tokens: first-token spellings counted as yes / no (yes_no_logprob).
        top_logprobs: candidates asked for with ``logprobs: true`` (yes_no_logprob; OpenAI allows up to 20).
        image_size: resize images to this square side before sending (null = as generated).
        api_key_env: name of the environment variable holding the API key (null = no Authorization header).
        concurrency: requests in flight at once (a bounded thread pool per batch).
        timeout: seconds to wait for one request.
        retries: extra tries after a connection error, timeout or HTTP 408 / 425 / 429 / 5xx.
        retry_wait: seconds before the first retry (doubling each retry).
        max_tokens, temperature: generation settings of the judge.
        extra_body: more request fields, merged in (e.g. vLLM's ``top_k``, ``chat_template_kwargs``).
        max_failed_batches: consecutive rollout batches with no finite reward after which the run stops (an error
            and a checkpoint; 0 = never). Such batches are never trained on either way.
        check_at_start: ``GET {base_url}/models`` in :meth:`check_ready` (``htgrpo.fit`` calls it at start-up): an
            unreachable server, a rejected key or an unknown model stops the run there, naming the key to fix.
    """

    name = "vlm_judge"
    io_bound = True  # waits on another process: algorithm.overlap_scoring=auto overlaps it with sampling

    def __init__(self, base_url: str, model: str, prompt_template: str, system_prompt: str | None = None,
                 parse: str = "number", score_range: Sequence[float] = (0.0, 10.0), number_pattern: str | None = None,
                 json_key: str = "score", yes_tokens: Sequence[str] = ("yes",), no_tokens: Sequence[str] = ("no",),
                 top_logprobs: int = 5, image_size: int | None = None, api_key_env: str | None = None,
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3, retry_wait: float = 1.0,
                 max_tokens: int = 64, temperature: float = 0.0, extra_body: Mapping[str, Any] | None = None,
                 max_failed_batches: int = 3, check_at_start: bool = True) -> None:
        super().__init__()
        require(isinstance(base_url, str) and base_url.startswith(("http://", "https://")), "base_url",
                f"must be an http(s) URL ending in /v1, e.g. http://127.0.0.1:8000/v1, got {base_url!r}")
        require(isinstance(model, str) and bool(model), "model",
                "must name the served model (the NAME of `vllm serve NAME`), e.g. reward.model=Qwen/Qwen2.5-VL-7B-Instruct")
        require(isinstance(prompt_template, str) and bool(prompt_template.strip()), "prompt_template",
                "must be a non-empty text ({prompt} is replaced by the image's prompt)")
        require_choice(parse, PARSE_RULES, "parse")
        lo_hi = [float(v) for v in score_range] if score_range is not None else []
        require(len(lo_hi) == 2 and lo_hi[0] < lo_hi[1], "score_range", f"must be [low, high] with low < high, got {score_range}")
        if number_pattern:
            try:
                re.compile(number_pattern)
            except re.error as err:
                raise ConfigError("number_pattern", f"not a valid regular expression ({err})") from None
        require(isinstance(json_key, str) and bool(json_key), "json_key", "must name the score's key, e.g. score")
        require(len(list(yes_tokens)) > 0 and len(list(no_tokens)) > 0, "yes_tokens",
                "yes_tokens and no_tokens must each hold at least one spelling")
        require(1 <= int(top_logprobs) <= 20, "top_logprobs", f"must be in [1, 20], got {top_logprobs}")
        require(image_size is None or int(image_size) >= 8, "image_size", f"must be >= 8 pixels or null, got {image_size}")
        require(int(concurrency) >= 1, "concurrency", f"must be >= 1, got {concurrency}")
        require(float(timeout) > 0, "timeout", f"must be > 0 seconds, got {timeout}")
        require(int(retries) >= 0, "retries", f"must be >= 0, got {retries}")
        require(float(retry_wait) >= 0, "retry_wait", f"must be >= 0, got {retry_wait}")
        require(int(max_tokens) >= 1, "max_tokens", f"must be >= 1, got {max_tokens}")
        require(float(temperature) >= 0, "temperature", f"must be >= 0, got {temperature}")
        require(int(max_failed_batches) >= 0, "max_failed_batches", f"must be >= 0 (0 = never stop), got {max_failed_batches}")
        self.api_key = self._read_api_key(api_key_env)

        self.base_url = base_url.rstrip("/")
        self.model, self.prompt_template = model, prompt_template
        self.system_prompt = system_prompt or None
        self.parse = parse
        self.score_range = (lo_hi[0], lo_hi[1])
        self.number_pattern = number_pattern or None
        self.json_key = json_key
        self.yes_tokens, self.no_tokens = tuple(yes_tokens), tuple(no_tokens)
        self.top_logprobs = int(top_logprobs)
        self.image_size = None if image_size is None else int(image_size)
        self.concurrency, self.timeout = int(concurrency), float(timeout)
        self.retries, self.retry_wait = int(retries), float(retry_wait)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.extra_body = dict(extra_body or {})
        self.num_unparseable = 0      # replies that did not parse (NaN rewards), over this object's life
        self.num_failed_requests = 0  # requests that failed after every retry (NaN rewards)
        self.last_failure: str | None = None  # the latest failure, quoted when max_failed_batches stops the run
        self._counter_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # created on first use, kept: no thread start-up per batch
        self.max_failed_batches = int(max_failed_batches)
        self.check_at_start = bool(check_at_start)

    # -- configuration ----------------------------------------------------------------------------------------------
    @staticmethod
    def _read_api_key(api_key_env: str | None) -> str | None:
        if not api_key_env:
            return None
        require(isinstance(api_key_env, str) and bool(_ENV_NAME.match(api_key_env)), "api_key_env",
                "must be the NAME of an environment variable holding the key (e.g. OPENAI_API_KEY), never the key "
                "itself: `export OPENAI_API_KEY=...` and set reward.api_key_env=OPENAI_API_KEY")
        key = os.environ.get(api_key_env)
        require(bool(key), "api_key_env", f"environment variable {api_key_env} is not set (export it, or set "
                                          "reward.api_key_env=null for a server without a key)")
        return key

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_counter_lock", None)  # locks and threads do not pickle (ddp_spawn pickles the module)
        state["_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._counter_lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._counter_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="vlm-judge")
            return self._pool

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def check_ready(self) -> None:
        """Start-up check (``htgrpo.fit`` calls it before validation and training): :meth:`check_connection` unless
        ``check_at_start`` is false."""
        if self.check_at_start:
            self.check_connection()

    def check_connection(self) -> None:
        """``GET {base_url}/models``: raise :class:`ConfigError` naming the key to fix when the server cannot be
        reached, rejects the key (401/403), has no such route (404: base_url must end in /v1) or does not serve
        ``model``."""
        url = f"{self.base_url}/models"
        try:
            body = self._request("GET", url, None)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise ConfigError("api_key_env", f"{url} answered HTTP {err.code}: the server rejected the API key "
                                                 "(set reward.api_key_env to the variable holding the right key)") from None
            if err.code == 404:
                raise ConfigError("base_url", f"{url} answered HTTP 404: base_url must be the API root ending in /v1 "
                                              "(or set reward.check_at_start=false for a server without /models)") from None
            raise ConfigError("base_url", f"{url} answered HTTP {err.code} after {self.retries} retries") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ConfigError("base_url", f"cannot reach {url} ({err}); start the judge server (README \"VLM judge "
                                          "rewards\") or fix reward.base_url") from None
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
        if served and self.model not in served:
            raise ConfigError("model", f"{self.base_url} serves {served}, not {self.model!r}")

    # -- one request -------------------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, payload: bytes | None) -> Any:
        """One HTTP exchange with retries on connection errors, timeouts and the HTTP statuses of
        ``remote.TRANSIENT_STATUSES`` (408/425/429/5xx; ``retry_wait``, doubling). Returns the decoded JSON body;
        raises the last error."""
        wait = self.retry_wait
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            req = urllib.request.Request(url, data=payload, headers=self._headers(), method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                err.read()
                if err.code not in TRANSIENT_STATUSES or attempt == self.retries:
                    raise
            except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
                if attempt == self.retries:
                    raise
                log.debug("request to %s failed (%s); retrying", url, err)
        raise AssertionError("unreachable")

    def request_body(self, image_chw: torch.Tensor, prompt: str) -> dict[str, Any]:
        """The chat-completions request for one image (module docstring)."""
        text = self.prompt_template.replace("{prompt}", prompt)
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(image_chw, self.image_size)}},
            {"type": "text", "text": text},
        ]})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "temperature": self.temperature}
        if self.parse == "yes_no_logprob":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    def parse_reply(self, reply: JudgeReply) -> tuple[float | None, float | None]:
        """(reward in [0, 1], the judge's raw value) of a reply; reward None when it does not parse."""
        if self.parse == "yes_no_logprob":
            if reply.top_logprobs is not None:
                p = yes_probability(reply.top_logprobs, self.yes_tokens, self.no_tokens)
            else:
                p = yes_no_from_text(reply.text, self.yes_tokens, self.no_tokens)
            return p, p
        raw = (first_number(reply.text, self.number_pattern) if self.parse == "number"
               else json_value(reply.text, self.json_key))
        if raw is None:
            return None, None
        return scale_to_unit(raw, *self.score_range), raw

    def _count(self, attribute: str) -> None:
        with self._counter_lock:
            setattr(self, attribute, getattr(self, attribute) + 1)

    def score_one(self, image_chw: torch.Tensor, record: Any) -> tuple[float, float, bool]:
        """(reward, raw value, parsed) of one image; NaN reward when the request failed or the reply did not parse."""
        prompt = record_prompt(record) if "{prompt}" in self.prompt_template else ""
        payload = json.dumps(self.request_body(image_chw, prompt)).encode("utf-8")
        try:
            body = self._request("POST", f"{self.base_url}/chat/completions", payload)
            reply = JudgeReply.from_response(body)
        except (urllib.error.URLError, OSError, ValueError) as err:
            detail = f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else f"{type(err).__name__}: {err}"
            self._count("num_failed_requests")
            self.last_failure = f"POST {self.base_url}/chat/completions failed after {self.retries} retries ({detail})"
            log.warning("vlm_judge: request to %s failed after %d retries (%s); the image's reward is NaN",
                        self.base_url, self.retries, detail)
            return math.nan, math.nan, True
        value, raw = self.parse_reply(reply)
        if value is None:
            self._count("num_unparseable")
            self.last_failure = f"unparseable reply (parse={self.parse}): {reply.text[:200]!r}"
            log.warning("vlm_judge: unparseable reply (parse=%s, score_range=%s, %d so far): %r; the image's reward "
                        "is NaN", self.parse, list(self.score_range), self.num_unparseable, reply.text[:200])
            return math.nan, math.nan if raw is None else raw, False
        return float(value), float(raw), True

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images)
        n = batch.shape[0]
        if len(records) != n:
            raise ValueError(f"got {n} images but {len(records)} records")
        # Threads, not processes: each request waits on the network; at most `concurrency` in flight (the pool's
        # size); results come back in image order.
        results = list(self._executor().map(self.score_one, list(batch), list(records)))
        scores = torch.tensor([r[0] for r in results], dtype=torch.float32)
        raw = torch.tensor([r[1] for r in results], dtype=torch.float32)
        unparseable = torch.tensor([0.0 if r[2] else 1.0 for r in results], dtype=torch.float32)
        return RewardOutput(scores, {"vlm_judge/raw": raw, "vlm_judge/unparseable": unparseable},
                            num_failed=int((~torch.isfinite(scores)).sum()))
