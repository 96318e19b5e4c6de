"""``reward=remote``: score images with a reward served over HTTP by ``python -m htgrpo.serve`` (or any server that
speaks the same protocol), so a big reward model can live on its own GPU or machine.

Protocol (JSON over HTTP, never pickle)::

    GET  /health  -> 200 {"status": "ok", "reward": NAME, "limits": {...}}  once the reward is loaded
                     (503 {"status": "loading"} before; "limits" is optional: max_images, max_pixels,
                     max_request_pixels, max_body_bytes)
    POST /score   {"images": [<base64 PNG>, ...], "records": [<record JSON or null>, ...]}
               -> 200 {"scores": [float | null, ...], "components": {name: [float | null, ...]}, "num_failed": int}
               -> 400 {"error": REASON}  malformed request (the server keeps serving)
               -> 401 {"error": ...}     missing / wrong bearer token (when the server has one)
               -> 413 {"error": ...}     body or pixels over the server's limits
               -> 503 {"error": ...}     loading or busy (retry)

* images: RGB PNG files, base64 (standard alphabet), all of one size within a request;
* records: ``htgrpo.data.records.record_to_json`` (``{"type": "geneval" | "dpg" | "prompt", ...}``) or null;
  ``records`` may be omitted (all null) for prompt-free rewards such as JPEG or aesthetics;
* ``null`` in ``scores`` / ``components`` = NaN (scoring that image failed / the component does not apply);
* headers ``Content-Type: application/json`` and, when the server has a token, ``Authorization: Bearer TOKEN``.

The client (:class:`RemoteReward`) fails fast on what a retry cannot fix and waits out what it can:

* ``check_ready`` (called by ``htgrpo.fit`` before anything else runs): ``GET /health``; 401/403 (token) and 404
  (URL) stop the run at once naming the URL, the status and the key to fix; a server still loading (503) or not up
  yet is waited for up to ``startup_timeout`` seconds.
* a failing ``POST /score`` (connection refused or reset, timeout, 408/429/5xx) is retried with exponential backoff
  (``retry_wait`` doubling up to ``max_retry_wait``) until ``retry_seconds`` after the outage began, long enough to
  outlast a server restart; after that (each later request of the same outage is tried once), or on an answer a
  retry cannot change (400, 401, 413 ...), the request's images get NaN rewards.
* the training modules never train on a rollout batch with no finite reward, and after ``max_failed_batches`` such
  batches in a row the run stops with an error and a checkpoint (``GRPOModule.skip_unscored_batch``).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from htgrpo.config import ConfigError, require
from htgrpo.data.records import record_from_json, record_to_json
from htgrpo.reward_http import TOKEN_ENV, ImageLimits, TokenError, check_png_batch, load_token
from htgrpo.rewards.base import Reward, RewardOutput, check_images

log = logging.getLogger("htgrpo.rewards.remote")

#: HTTP statuses worth a retry: the server is restarting, loading, busy or timed out.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

__all__ = ["TOKEN_ENV", "TRANSIENT_STATUSES", "ProtocolError", "RemoteReward", "backoff_waits", "build_request",
           "decode_png_b64", "encode_png_b64", "output_from_json", "output_to_json", "parse_request"]


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


def parse_request(body: Any, limits: ImageLimits | int) -> tuple[torch.Tensor, list[Any]]:
    """Validate a decoded ``POST /score`` body -> (uint8 ``(B, 3, H, W)``, records).

    Count, format and pixels are checked from the PNG headers before any image is decoded
    (:func:`htgrpo.reward_http.check_png_batch`, :class:`~htgrpo.reward_http.RequestError` 400 / 413); the rest
    raises :class:`ProtocolError`. ``limits`` may be just the most images a request may carry.
    """
    if not isinstance(limits, ImageLimits):
        limits = ImageLimits(max_images=int(limits))
    if not isinstance(body, dict):
        raise ProtocolError("body must be a JSON object {images: [...], records: [...]}")
    unknown = set(body) - {"images", "records"}
    if unknown:
        raise ProtocolError(f"unknown keys {sorted(unknown)}; expected images and records")
    images = body.get("images")
    headers = check_png_batch(images, limits)
    records = body.get("records", [None] * len(images))
    if not isinstance(records, list) or len(records) != len(images):
        raise ProtocolError(f"records must be a list with one entry per image ({len(images)})")
    sizes = sorted({(h.height, h.width) for h in headers})
    if len(sizes) != 1:
        raise ProtocolError(f"all images of a request must have one size, got {sizes} (height, width)")
    try:
        recs = [record_from_json(r, f"records[{i}]") for i, r in enumerate(records)]
    except ValueError as err:
        raise ProtocolError(str(err)) from None
    tensors = [decode_png_b64(im, i) for i, im in enumerate(images)]
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
def backoff_waits(first: float, cap: float, budget: float) -> list[float]:
    """The sleeps of an exponential backoff: ``first, 2·first, 4·first, ...`` each capped at ``cap``, as many as fit
    in ``budget`` seconds (the last one cut to what is left). E.g. (0.5, 4, 10) -> [0.5, 1, 2, 4, 2.5]."""
    waits, total, wait = [], 0.0, float(first)
    if wait <= 0:
        return waits
    while total < budget:
        step = min(wait, cap, budget - total)
        waits.append(step)
        total += step
        wait *= 2
    return waits


class RemoteReward(Reward):
    """Client of a reward server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8500``.
        timeout: seconds to wait for one HTTP request.
        retry_seconds: how long an outage is waited out: a failing ``POST /score`` (connection refused / reset,
            timeout, 408, 429, 5xx) is retried until this many seconds after the first failure since the server last
            answered, then its images get NaN; later requests of the same outage are tried once. 0 = one try.
        retry_wait: seconds before the first retry; doubles each retry up to ``max_retry_wait``.
        max_retry_wait: longest wait between two tries.
        batch_size: images per request (0 = the whole batch); batches are also split to fit the limits the server
            announces on ``/health``.
        max_failed_batches: consecutive rollout batches with no finite reward after which training stops (an error
            and a checkpoint); 0 = never. Batches with no finite reward are never trained on.
        startup_timeout: seconds ``check_ready`` waits for a server that is not up or still loading.
        token_file: file holding the bearer token; null reads ``$HTGRPO_REWARD_TOKEN`` (unset = no token).
        token: refused: a token in the config would be written to ``.hydra/*.yaml`` and the loggers.
    """

    name = "remote"
    io_bound = True  # waits on the server: algorithm.overlap_scoring=auto overlaps it with sampling
    cheap_to_build = True  # fit checks the server (check_ready) before loading the policy

    def __init__(self, url: str, timeout: float = 60.0, retry_seconds: float = 120.0, retry_wait: float = 0.5,
                 max_retry_wait: float = 10.0, batch_size: int = 0, max_failed_batches: int = 3,
                 startup_timeout: float = 600.0, token_file: str | None = None, token: Any = None) -> None:
        super().__init__()
        require(isinstance(url, str) and url.startswith(("http://", "https://")), "url",
                f"must be an http(s) URL such as http://127.0.0.1:8500, got {url!r}")
        require(token is None, "token", f"is not accepted: Hydra writes every config value into .hydra/*.yaml and "
                                        f"the loggers. Export {TOKEN_ENV}=TOKEN or set reward.token_file=PATH")
        require(float(timeout) > 0, "timeout", f"must be > 0 seconds, got {timeout}")
        require(float(retry_seconds) >= 0, "retry_seconds", f"must be >= 0, got {retry_seconds}")
        require(float(retry_wait) > 0, "retry_wait", f"must be > 0, got {retry_wait}")
        require(float(max_retry_wait) >= float(retry_wait), "max_retry_wait",
                f"must be >= retry_wait ({retry_wait}), got {max_retry_wait}")
        require(int(batch_size) >= 0, "batch_size", f"must be >= 0 (0 = whole batch), got {batch_size}")
        require(int(max_failed_batches) >= 0, "max_failed_batches", f"must be >= 0 (0 = never stop), got {max_failed_batches}")
        require(float(startup_timeout) >= 0, "startup_timeout", f"must be >= 0, got {startup_timeout}")
        self.url = url.rstrip("/")
        self.timeout, self.retry_seconds = float(timeout), float(retry_seconds)
        self.retry_wait, self.max_retry_wait = float(retry_wait), float(max_retry_wait)
        self.batch_size, self.max_failed_batches = int(batch_size), int(max_failed_batches)
        self.startup_timeout = float(startup_timeout)
        self.token_file = token_file
        try:
            self.token = load_token(token_file)
        except TokenError as err:
            raise ConfigError("token_file", str(err)) from None
        self.server_limits: dict[str, int] = {}  # from GET /health (check_ready)
        self.last_failure: str | None = None    # why the last request gave NaN (read by the stop message)
        self._outage_lock = threading.Lock()
        self._failing_since: float | None = None

    def __getstate__(self) -> dict[str, Any]:  # picklable (ddp_spawn pickles the module and its reward)
        state = dict(self.__dict__)
        state.pop("_outage_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._outage_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return f"RemoteReward(url={self.url!r}, token={'set' if self.token else 'none'})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def health(self) -> dict[str, Any]:
        """``GET /health`` once (raises on failure)."""
        req = urllib.request.Request(f"{self.url}/health", headers=self._headers())
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    # -- start-up ----------------------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Wait until ``GET /health`` answers 200, for up to ``startup_timeout`` s; keep the server's limits.

        Raises :class:`~htgrpo.config.ConfigError` at once for 401/403 (key ``token_file``: the token) and for 404 or
        another 4xx, or a 200 that is not this protocol (key ``url``), and after ``startup_timeout`` for a server that
        never became ready (key ``url``).
        """
        deadline = time.monotonic() + self.startup_timeout
        waits = iter(backoff_waits(self.retry_wait, self.max_retry_wait, self.startup_timeout))
        where = f"{self.url}/health"
        while True:
            try:
                body = self.health()
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code in (401, 403):
                    given = "the token sent was refused" if self.token else "no token was sent"
                    raise ConfigError("token_file", f"reward server {where} answered HTTP {err.code} ({detail}): "
                                                    f"{given}. Export {TOKEN_ENV}=<the server's token> or set "
                                                    "reward.token_file=PATH") from None
                if err.code not in TRANSIENT_STATUSES:
                    hint = " (no reward server at this URL? reward.url is the server's base URL, e.g. " \
                           "http://127.0.0.1:8500, without a path)" if err.code == 404 else ""
                    raise ConfigError("url", f"reward server {where} answered HTTP {err.code} ({detail}){hint}") \
                        from None
                last = f"HTTP {err.code} ({detail})"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                last = _describe(err)
            except ValueError as err:  # 200 with a body that is not JSON
                raise ConfigError("url", f"{where} answered 200 but not the reward-server protocol ({err})") from None
            else:
                if not isinstance(body, dict) or body.get("status") != "ok":
                    raise ConfigError("url", f"{where} answered 200 but not the reward-server protocol: "
                                             f"{str(body)[:200]}")
                limits = body.get("limits")
                self.server_limits = {str(k): int(v) for k, v in limits.items()} if isinstance(limits, dict) else {}
                log.info("reward server %s ready: reward %r, limits %s", self.url, body.get("reward"),
                         self.server_limits or "not announced")
                return
            wait = next(waits, None)
            if wait is None or time.monotonic() + wait > deadline:
                raise ConfigError("url", f"no reward server ready at {where} within {self.startup_timeout:.0f} s "
                                         f"(reward.startup_timeout); last: {last}. Start one with `python -m "
                                         "htgrpo.serve reward=NAME serve.port=PORT` or fix reward.url")
            log.warning("reward server %s not ready (%s); waiting %.1f s", self.url, last, wait)
            time.sleep(wait)

    # -- scoring -----------------------------------------------------------------------------------------------
    def _post(self, body: bytes, n: int) -> RewardOutput:
        """One ``POST /score``; NaN for all ``n`` images when it does not succeed.

        Transient failures are retried with backoff until ``retry_seconds`` after the *outage* began (the first
        failure since the server last answered), not after this request began: requests sent during one outage
        (the chunks of a rollout batch, the next batches) share one window, so a server that stays down costs
        ``retry_seconds`` once, after which each request is tried once until the server answers again.
        """
        started = time.monotonic()
        with self._outage_lock:
            outage_began = self._failing_since
        deadline = (started if outage_began is None else outage_began) + self.retry_seconds
        waits = iter(backoff_waits(self.retry_wait, self.max_retry_wait, max(deadline - started, 0.0)))
        tries = 0
        while True:
            tries += 1
            req = urllib.request.Request(f"{self.url}/score", data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    out = output_from_json(json.loads(resp.read()), n)
                self._recovered()
                return out
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {_error_detail(err)}"
                if err.code not in TRANSIENT_STATUSES:
                    break  # our request is wrong, too big or not authorised: a retry cannot help
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                last = _describe(err)
            except (ProtocolError, ValueError) as err:  # an answer that is not the protocol
                last = f"bad answer: {err}"
                break
            self._failing(last)
            wait = next(waits, None)
            if wait is None or time.monotonic() + wait > deadline + 1e-3:
                break
            time.sleep(wait)
        self.last_failure = f"POST {self.url}/score: {last} (after {tries} tries in " \
                            f"{time.monotonic() - started:.1f} s, reward.retry_seconds={self.retry_seconds:g})"
        log.warning("reward server %s failed for %d images: %s; their rewards are NaN", self.url, n, self.last_failure)
        return RewardOutput(torch.full((n,), math.nan), num_failed=n)

    def _failing(self, reason: str) -> None:
        """Note a transient failure: the first one since the server last answered starts the outage window."""
        with self._outage_lock:
            first = self._failing_since is None
            if first:
                self._failing_since = time.monotonic()
        if first:
            log.warning("reward server %s: %s; retrying for up to %g s (reward.retry_seconds)", self.url, reason,
                        self.retry_seconds)
        else:
            log.debug("reward server %s still failing: %s", self.url, reason)

    def _recovered(self) -> None:
        with self._outage_lock:
            since, self._failing_since = self._failing_since, None
        if since is not None:
            log.warning("reward server %s answers again after %.1f s", self.url, time.monotonic() - since)

    def images_per_request(self, n: int, height: int, width: int) -> int:
        """Images per ``POST /score``: ``batch_size`` (0 = all ``n``), within the server's announced limits (image
        count, pixels per request, and body bytes at the worst case of 4 bytes per pixel: base64 of 3-byte RGB)."""
        size = self.batch_size or n
        lim, px = self.server_limits, height * width
        if "max_images" in lim:
            size = min(size, lim["max_images"])
        if "max_request_pixels" in lim:
            size = min(size, lim["max_request_pixels"] // px)
        if "max_body_bytes" in lim:
            size = min(size, lim["max_body_bytes"] // (4 * px + 4096))
        return max(size, 0)

    def score(self, images: Any, records: Sequence[Any]) -> RewardOutput:
        batch = check_images(images)
        n, height, width = batch.shape[0], batch.shape[2], batch.shape[3]
        if len(records) != n:
            raise ValueError(f"got {n} images but {len(records)} records")
        size = self.images_per_request(n, height, width)
        if size < 1:
            self.last_failure = (f"one {width}x{height} image exceeds the limits {self.server_limits} of the reward "
                                 f"server {self.url} (serve.max_pixels / serve.max_body_mb there)")
            log.error("%s; the rewards are NaN", self.last_failure)
            return RewardOutput(torch.full((n,), math.nan), num_failed=n)
        parts = []
        for start in range(0, n, size):
            chunk, recs = batch[start:start + size], list(records[start:start + size])
            body = json.dumps(build_request(chunk, recs)).encode("utf-8")
            parts.append(self._post(body, len(recs)))
        return RewardOutput.concat(parts)


def _describe(err: BaseException) -> str:
    """``ConnectionRefusedError: [Errno 111] Connection refused`` for a connection failure (urllib wraps the socket
    error in ``URLError.reason``), ``TimeoutError: ...`` etc."""
    reason = getattr(err, "reason", None)
    inner = reason if isinstance(reason, BaseException) else err
    return f"{type(inner).__name__}: {inner}"


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The ``error`` of an HTTP error's JSON body (or its first 200 characters)."""
    try:
        raw = err.read()[:2000]
    except OSError:
        return err.reason if isinstance(err.reason, str) else ""
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])[:300]
    except ValueError:
        pass
    return raw[:200].decode("utf-8", "replace")
