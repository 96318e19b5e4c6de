"""``python -m htgrpo.serve reward=NAME serve.host=127.0.0.1 serve.port=8500`` — serve a reward over HTTP.

Puts any reward of ``conf/reward/`` behind HTTP so that a big reward model can live on its own GPU or machine;
training then uses ``reward=remote reward.url=http://HOST:PORT``. The protocol (JSON, base64 PNG images, never
pickle) is documented in :mod:`htgrpo.rewards.remote` and the README.

* The port opens at once; ``GET /health`` answers 503 while the reward loads and 200 (with the server's limits)
  once it is ready.
* Hardened for a long run on a shared network (:mod:`htgrpo.reward_http`): a fixed pool of ``serve.workers``
  threads (``serve.max_pending`` more connections wait, the next get 503); a per-request deadline
  ``serve.timeout_s`` (slow senders are closed); method, path and bearer token checked before any body byte is read
  (constant-time compare); ``serve.max_body_mb`` per body and ``serve.max_inflight_mb`` for all bodies at once;
  image count, format (PNG only) and pixels (``serve.max_pixels`` per image, ``serve.max_request_pixels`` per
  request) checked from the PNG headers before anything is decoded; ``serve.decode_concurrency`` requests decode
  and score at once, and scoring itself is serialised by a lock (one batch on the model at a time).
* Any malformed request gets a 4xx with the reason; a scorer exception becomes NaN for the images it hits
  (``safe_score``); the server keeps serving whatever it is sent.
* The token comes from ``$HTGRPO_REWARD_TOKEN`` or the file ``serve.token_file``, never from a config value (Hydra
  writes every config value into ``.hydra/*.yaml``). Binds to 127.0.0.1 unless ``serve.host`` says otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

import hydra
from omegaconf import DictConfig

from htgrpo._hydra import config_dir, run_or_exit_on_config_error
from htgrpo.config import ConfigError, instantiate_node, require
from htgrpo.reward_http import (
    TOKEN_ENV,
    BoundedHTTPServer,
    GuardedHandler,
    ImageLimits,
    RequestError,
    ServerGuard,
    TokenError,
    load_token,
)
from htgrpo.rewards.base import safe_score
from htgrpo.rewards.remote import ProtocolError, output_to_json, parse_request

log = logging.getLogger("htgrpo.serve")

MIB = 2**20


class RewardServer:
    """A reward behind a hardened HTTP server (see the module docstring and :mod:`htgrpo.reward_http`).

    Args:
        host, port: where to listen (port 0 = a free port, see ``self.port``).
        token: bearer token required on every request, or None.
        max_images: most images one request may carry.
        max_body_mb: largest request body accepted, in MiB.
        max_pixels: most pixels one image may have (width × height from its PNG header).
        max_request_pixels: most pixels all images of one request may have together.
        workers: threads handling connections.
        max_pending: connections accepted beyond ``workers``, waiting for a thread; more get 503.
        timeout_s: seconds a request (line, headers, body) may take to arrive; also the idle keep-alive limit.
        max_inflight_mb: MiB of request bodies held at once by all connections.
        decode_concurrency: requests decoding / scoring images at once.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8500, token: str | None = None,
                 max_images: int = 256, max_body_mb: float = 320.0, *, max_pixels: int = 2048 * 2048,
                 max_request_pixels: int = 64 * MIB, workers: int = 32, max_pending: int = 64,
                 timeout_s: float = 30.0, max_inflight_mb: float = 1024.0, decode_concurrency: int = 2) -> None:
        require(0 <= int(port) <= 65535, "serve.port", f"must be in [0, 65535], got {port}")
        require(int(max_images) >= 1, "serve.max_images", f"must be >= 1, got {max_images}")
        require(float(max_body_mb) > 0, "serve.max_body_mb", f"must be > 0, got {max_body_mb}")
        require(int(max_pixels) >= 1, "serve.max_pixels", f"must be >= 1, got {max_pixels}")
        require(int(max_request_pixels) >= int(max_pixels), "serve.max_request_pixels",
                f"must be >= serve.max_pixels ({max_pixels}), got {max_request_pixels}")
        require(int(workers) >= 1, "serve.workers", f"must be >= 1, got {workers}")
        require(int(max_pending) >= 0, "serve.max_pending", f"must be >= 0, got {max_pending}")
        require(float(timeout_s) > 0, "serve.timeout_s", f"must be > 0 seconds, got {timeout_s}")
        require(float(max_inflight_mb) >= float(max_body_mb), "serve.max_inflight_mb",
                f"must be >= serve.max_body_mb ({max_body_mb}), got {max_inflight_mb}")
        require(int(decode_concurrency) >= 1, "serve.decode_concurrency", f"must be >= 1, got {decode_concurrency}")
        self.token = token or None
        self.limits = ImageLimits(int(max_images), int(max_pixels), int(max_request_pixels))
        self.guard = ServerGuard(token=self.token, timeout_s=float(timeout_s),
                                 max_body_bytes=int(float(max_body_mb) * MIB),
                                 max_inflight_bytes=int(float(max_inflight_mb) * MIB),
                                 decode_concurrency=int(decode_concurrency), limits=self.limits)
        self.max_images, self.max_body = self.limits.max_images, self.guard.max_body_bytes
        self.reward: Any = None
        self.reward_name = "loading"
        self.lock = threading.Lock()  # one batch on the model at a time
        self.requests_served = 0
        server = self

        class Handler(GuardedHandler):
            guard = server.guard

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if not self.allowed("/health"):
                    return
                close = self.has_body()  # a GET body is never read: the connection cannot be reused
                if server.reward is None:
                    self.send_json(503, {"status": "loading"}, close=close, extra={"Retry-After": "5"})
                else:
                    self.send_json(200, server.health(), close=close)

            def do_POST(self) -> None:  # noqa: N802
                if not self.allowed("/score"):
                    return
                if server.reward is None:
                    self.send_json(503, {"status": "loading"}, close=True, extra={"Retry-After": "5"})
                    return
                got = self.read_json_body()
                if got is None:
                    return
                body, reserved = got
                try:
                    code, answer = server.handle_score(body)
                finally:
                    del body
                    server.guard.body_budget.release(reserved)
                self.send_json(code, answer, extra={"Retry-After": "1"} if code == 503 else None)

        self.httpd = BoundedHTTPServer((host, int(port)), Handler, workers=int(workers), max_pending=int(max_pending))
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def health(self) -> dict[str, Any]:
        """The ``GET /health`` answer of a ready server: the reward's name, the requests scored so far, and the
        request limits (the client splits its batches to fit them)."""
        return {"status": "ok", "reward": self.reward_name, "requests_served": self.requests_served,
                "limits": {**self.limits.as_json(), "max_body_bytes": self.guard.max_body_bytes}}

    def handle_score(self, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) of a parsed ``POST /score`` body: checks, decode and scoring, with at most
        ``decode_concurrency`` requests holding decoded images at once."""
        if not self.guard.decode_slots.acquire(timeout=self.guard.timeout_s):
            return 503, {"error": "server busy (serve.decode_concurrency requests decoding); retry"}
        try:
            images, records = parse_request(body, self.limits)
            with self.lock:
                output = safe_score(self.reward, images, records)
                self.requests_served += 1
            return 200, output_to_json(output)
        except RequestError as err:
            return err.status, {"error": err.message}
        except ProtocolError as err:
            return 400, {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - the server must keep serving
            log.exception("scoring failed")
            return 500, {"error": f"{type(err).__name__}: {err}"}
        finally:
            self.guard.decode_slots.release()

    def set_reward(self, reward: Any) -> None:
        """Install the loaded reward: ``/health`` answers 200 from now on."""
        self.reward_name = str(getattr(reward, "name", type(reward).__name__))
        self.reward = reward

    def start(self) -> "RewardServer":
        """Serve in a background thread (returns at once)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="reward-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(serve_cfg: Any) -> str | None:
    """The token from ``serve.token_file`` or ``$HTGRPO_REWARD_TOKEN`` (None: no token). A ``serve.token`` value is
    refused: Hydra would already have written it into the run's ``.hydra/*.yaml``."""
    if "token" in serve_cfg:
        raise ConfigError("serve.token", f"is not accepted: Hydra writes every config value into .hydra/*.yaml. "
                                         f"Export {TOKEN_ENV}=TOKEN or set serve.token_file=PATH (a file holding it)")
    try:
        return load_token(serve_cfg.get("token_file"))
    except TokenError as err:
        raise ConfigError("serve.token_file", str(err)) from None


def run(cfg: DictConfig) -> None:
    s = cfg.serve
    token = server_token(s)
    server = RewardServer(str(s.host), int(s.port), token, int(s.max_images), float(s.max_body_mb),
                          max_pixels=int(s.max_pixels), max_request_pixels=int(s.max_request_pixels),
                          workers=int(s.workers), max_pending=int(s.max_pending), timeout_s=float(s.timeout_s),
                          max_inflight_mb=float(s.max_inflight_mb),
                          decode_concurrency=int(s.decode_concurrency)).start()
    if not _is_loopback(str(s.host)) and token is None:
        log.warning("serving on %s without a token: anyone who can reach this port can use the reward "
                    "(set $%s or serve.token_file)", s.host, TOKEN_ENV)
    log.info("listening on %s (GET /health answers 503 until the reward is loaded)", server.url)
    t0 = time.perf_counter()
    try:
        reward = instantiate_node(cfg, "reward")
    except BaseException:
        server.stop()
        raise
    server.set_reward(reward)
    print(f"reward {server.reward_name!r} ready in {time.perf_counter() - t0:.1f} s: {server.url}  "
          f"(GET /health, POST /score{', bearer token required' if token else ''})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="serve")
def main(cfg: DictConfig) -> None:
    run_or_exit_on_config_error(run, cfg, log)


if __name__ == "__main__":
    main()
