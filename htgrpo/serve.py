"""``python -m htgrpo.serve reward=NAME serve.host=127.0.0.1 serve.port=8500 [serve.token=...]`` — serve a reward.

Puts any reward of ``conf/reward/`` behind HTTP so that a big reward model can live on its own GPU or machine;
training then uses ``reward=remote reward.url=http://HOST:PORT``. The protocol (JSON, base64 PNG images, never
pickle) is documented in :mod:`htgrpo.rewards.remote` and the README.

* The port opens at once; ``GET /health`` answers 503 while the reward loads and 200 once it is ready.
* Requests are served by threads; scoring itself is serialised by a lock (one batch on the model at a time),
  each request is one batch, and a scorer exception becomes NaN for the images it hits (``safe_score``).
* A malformed request gets HTTP 400 with the reason and the server keeps serving.
* Binds to 127.0.0.1 unless ``serve.host`` says otherwise; ``serve.token`` (or ``$HTGRPO_REWARD_TOKEN``) makes
  ``Authorization: Bearer TOKEN`` mandatory.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hydra
from omegaconf import DictConfig

from htgrpo._hydra import config_dir, run_or_exit_on_config_error
from htgrpo.config import instantiate_node, require
from htgrpo.rewards.base import safe_score
from htgrpo.rewards.remote import TOKEN_ENV, ProtocolError, output_to_json, parse_request

log = logging.getLogger("htgrpo.serve")


class RewardServer:
    """A reward behind a threaded HTTP server.

    Args:
        host, port: where to listen (port 0 = a free port, see ``self.port``).
        token: bearer token required on every request, or None.
        max_images: most images one request may carry.
        max_body_mb: largest request body accepted, in MiB.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8500, token: str | None = None,
                 max_images: int = 256, max_body_mb: float = 256.0) -> None:
        require(0 <= int(port) <= 65535, "serve.port", f"must be in [0, 65535], got {port}")
        require(int(max_images) >= 1, "serve.max_images", f"must be >= 1, got {max_images}")
        require(float(max_body_mb) > 0, "serve.max_body_mb", f"must be > 0, got {max_body_mb}")
        self.token = token or None
        self.max_images, self.max_body = int(max_images), int(float(max_body_mb) * 2**20)
        self.reward: Any = None
        self.reward_name = "loading"
        self.lock = threading.Lock()  # one batch on the model at a time
        self.requests_served = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one connection

            def log_message(self, fmt: str, *args: Any) -> None:  # route through logging, not stderr
                log.debug("%s %s", self.address_string(), fmt % args)

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.token is None:
                    return True
                given = self.headers.get("Authorization", "")
                if hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                    return True
                self._send(401, {"error": "missing or wrong bearer token (header Authorization: Bearer TOKEN)"})
                return False

            def _known_and_authorised(self, path: str) -> bool:
                """404 unless the request is for ``path``, then 401 unless it carries the token; True if neither."""
                if self.path.rstrip("/") != path:
                    self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})
                    return False
                return self._authorised()

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if not self._known_and_authorised("/health"):
                    return
                if server.reward is None:
                    self._send(503, {"status": "loading"})
                else:
                    self._send(200, {"status": "ok", "reward": server.reward_name})

            def do_POST(self) -> None:  # noqa: N802
                length_header = self.headers.get("Content-Length")
                try:
                    length = int(length_header) if length_header is not None else -1
                except ValueError:
                    length = -1
                if length < 0:
                    self.close_connection = True
                    self._send(400, {"error": "a Content-Length header is required"})
                    return
                if length > server.max_body:
                    self.close_connection = True  # we do not read the body: the connection cannot be reused
                    self._send(413, {"error": f"body of {length} bytes exceeds serve.max_body_mb"})
                    return
                raw = self.rfile.read(length)
                if not self._known_and_authorised("/score"):
                    return
                if server.reward is None:
                    self._send(503, {"status": "loading"})
                    return
                try:
                    body = json.loads(raw)
                    images, records = parse_request(body, server.max_images)
                except (ProtocolError, ValueError) as err:  # JSONDecodeError is a ValueError
                    self._send(400, {"error": str(err)})
                    return
                try:
                    with server.lock:
                        output = safe_score(server.reward, images, records)
                        server.requests_served += 1
                except Exception as err:  # noqa: BLE001 - the server must keep serving
                    log.exception("scoring failed")
                    self._send(500, {"error": f"{type(err).__name__}: {err}"})
                    return
                self._send(200, output_to_json(output))

        self.httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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


def run(cfg: DictConfig) -> None:
    s = cfg.serve
    token = s.get("token") or os.environ.get(TOKEN_ENV) or None
    server = RewardServer(str(s.host), int(s.port), token, int(s.max_images), float(s.max_body_mb)).start()
    if not _is_loopback(str(s.host)) and token is None:
        log.warning("serving on %s without a token: anyone who can reach this port can use the reward "
                    "(set serve.token or $%s)", s.host, TOKEN_ENV)
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
