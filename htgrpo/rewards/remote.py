"""``reward=remote``: score images with a reward served over HTTP by ``python -m htgrpo.serve`` (or any server that
speaks the same protocol), so a big reward model can live on its own GPU or machine.

Protocol (JSON over HTTP, never pickle)::

    GET  /health  -> 200 {"status": "ok", "reward": NAME}  once the reward is loaded (503 {"status": "loading"} before)
    POST /score   {"images": [<base64 PNG>, ...], "records": [<record JSON or null>, ...]}
               -> 200 {"scores": [float | null, ...], "components": {name: [float | null, ...]}, "num_failed": int}
               -> 400 {"error": REASON}  malformed request (the server keeps serving)
               -> 401 {"error": ...}     missing / wrong bearer token (when the server has one)

* images: RGB PNG files, base64 (standard alphabet), all of one size within a request;
* records: ``htgrpo.data.records.record_to_json`` (``{"type": "geneval" | "dpg" | "prompt", ...}``) or null;
  ``records`` may be omitted (all null) for prompt-free rewards such as JPEG or aesthetics;
* ``null`` in ``scores`` / ``components`` = NaN (scoring that image failed / the component does not apply);
* optional header ``Authorization: Bearer TOKEN``.

The client (:class:`RemoteReward`) has a per-request timeout and retries; when every try fails the whole batch gets
NaN rewards (counted by the training modules in ``train/nonfinite_rewards``, advantage 0) and training goes on.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from htgrpo.config import require
from htgrpo.data.records import record_from_json, record_to_json
from htgrpo.rewards.base import Reward, RewardOutput, check_images

log = logging.getLogger("htgrpo.rewards.remote")

#: environment variable read for the bearer token when ``token`` is not set (keeps it out of configs and logs).
TOKEN_ENV = "HTGRPO_REWARD_TOKEN"


class ProtocolError(ValueError):
    """A request or response does not follow the protocol (the server answers 400 with this message)."""


# ---- wire format ------------------------------------------------------------------------------------------------
def encode_png_b64(image_chw: torch.Tensor) -> str:
    """uint8 ``(3, H, W)`` image -> base64 of its PNG file (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_b64(text: Any, index: int = 0) -> torch.Tensor:
    """base64 PNG -> uint8 ``(3, H, W)``. Raises :class:`ProtocolError` naming ``images[index]``."""
    if not isinstance(text, str):
        raise ProtocolError(f"images[{index}]: expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                raise ProtocolError(f"images[{index}]: expected a PNG file, got {im.format}")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - binascii / PIL errors of all kinds
        raise ProtocolError(f"images[{index}]: not a base64 PNG ({type(err).__name__}: {err})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def build_request(images: torch.Tensor, records: Sequence[Any]) -> dict[str, Any]:
    """The JSON body of ``POST /score``."""
    batch = check_images(images)
    return {"images": [encode_png_b64(im) for im in batch], "records": [record_to_json(r) for r in records]}


def parse_request(body: Any, max_images: int) -> tuple[torch.Tensor, list[Any]]:
    """Validate a decoded ``POST /score`` body -> (uint8 ``(B, 3, H, W)``, records). Raises :class:`ProtocolError`."""
    if not isinstance(body, dict):
        raise ProtocolError("body must be a JSON object {images: [...], records: [...]}")
    unknown = set(body) - {"images", "records"}
    if unknown:
        raise ProtocolError(f"unknown keys {sorted(unknown)}; expected images and records")
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise ProtocolError("images must be a non-empty list of base64 PNG strings")
    if len(images) > max_images:
        raise ProtocolError(f"{len(images)} images in one request; this server takes at most {max_images}")
    records = body.get("records", [None] * len(images))
    if not isinstance(records, list) or len(records) != len(images):
        raise ProtocolError(f"records must be a list with one entry per image ({len(images)})")
    tensors = [decode_png_b64(im, i) for i, im in enumerate(images)]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) != 1:
        raise ProtocolError(f"all images of a request must have one size, got {sorted(sizes)}")
    try:
        recs = [record_from_json(r, f"records[{i}]") for i, r in enumerate(records)]
    except ValueError as err:
        raise ProtocolError(str(err)) from None
    return torch.stack(tensors), recs


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values.tolist()]


def output_to_json(output: RewardOutput) -> dict[str, Any]:
    """A :class:`RewardOutput` as the ``POST /score`` response (NaN / inf -> null)."""
    return {"scores": _nan_to_none(output.scores),
            "components": {k: _nan_to_none(v) for k, v in output.components.items()},
            "num_failed": int(output.num_failed)}


def output_from_json(body: Any, n: int) -> RewardOutput:
    """Parse a ``POST /score`` response for ``n`` images (null -> NaN). Raises :class:`ProtocolError`."""
    if not isinstance(body, dict) or not isinstance(body.get("scores"), list) or len(body["scores"]) != n:
        raise ProtocolError(f"response must hold 'scores' with {n} values, got {str(body)[:200]}")

    def vec(values: Any, what: str) -> torch.Tensor:
        if not isinstance(values, list) or len(values) != n:
            raise ProtocolError(f"{what}: expected {n} values")
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)

    comps = body.get("components") or {}
    if not isinstance(comps, dict):
        raise ProtocolError("components must be an object {name: [values]}")
    return RewardOutput(vec(body["scores"], "scores"), {str(k): vec(v, f"components.{k}") for k, v in comps.items()},
                        num_failed=int(body.get("num_failed", 0)))


# ---- client -----------------------------------------------------------------------------------------------------
class RemoteReward(Reward):
    """Client of a reward server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8500``.
        timeout: seconds to wait for one request.
        retries: extra tries after a failed request (connection error, timeout, HTTP 5xx / 503 loading).
        retry_wait: seconds before the first retry (doubling each retry).
        batch_size: images per request (0 = the whole batch in one request).
        token: bearer token; null reads ``$HTGRPO_REWARD_TOKEN`` (unset = no token).

    A batch whose request still fails after the retries (or gets a 4xx answer) scores NaN for all its images
    (``num_failed`` counts them); the caller's run goes on.
    """

    name = "remote"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, retry_wait: float = 0.5,
                 batch_size: int = 0, token: str | None = None) -> None:
        super().__init__()
        require(isinstance(url, str) and url.startswith(("http://", "https://")), "url",
                f"must be an http(s) URL such as http://127.0.0.1:8500, got {url!r}")
        require(float(timeout) > 0, "timeout", f"must be > 0 seconds, got {timeout}")
        require(int(retries) >= 0, "retries", f"must be >= 0, got {retries}")
        require(float(retry_wait) >= 0, "retry_wait", f"must be >= 0, got {retry_wait}")
        require(int(batch_size) >= 0, "batch_size", f"must be >= 0 (0 = whole batch), got {batch_size}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.retry_wait = float(timeout), int(retries), float(retry_wait)
        self.batch_size = int(batch_size)
        self.token = token if token else os.environ.get(TOKEN_ENV) or None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def health(self) -> dict[str, Any]:
        """``GET /health`` (raises on failure)."""
        req = urllib.request.Request(f"{self.url}/health", headers=self._headers())
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def _post(self, body: bytes, n: int) -> RewardOutput:
        wait = self.retry_wait
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            req = urllib.request.Request(f"{self.url}/score", data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return output_from_json(json.loads(resp.read()), n)
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode("utf-8", "replace")
                last = RuntimeError(f"HTTP {err.code}: {detail}")
                if 400 <= err.code < 500:
                    break  # our request is wrong (or not authorised): a retry cannot help
            except (urllib.error.URLError, OSError, ProtocolError, ValueError) as err:
                last = err
        log.warning("reward server %s failed for %d images (%s); their rewards are NaN", self.url, n, last)
        return RewardOutput(torch.full((n,), math.nan), num_failed=n)

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images)
        n = batch.shape[0]
        if len(records) != n:
            raise ValueError(f"got {n} images but {len(records)} records")
        size = self.batch_size or n
        parts = []
        for start in range(0, n, size):
            chunk, recs = batch[start:start + size], list(records[start:start + size])
            body = json.dumps(build_request(chunk, recs)).encode("utf-8")
            parts.append(self._post(body, len(recs)))
        return RewardOutput.concat(parts)
