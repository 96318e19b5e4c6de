"""A tiny fake OpenAI-compatible chat-completions server on 127.0.0.1, for trying ``reward=vlm_judge`` without a GPU
and for the tests and the scoring-overlap benchmark. It answers every ``POST /v1/chat/completions`` with a fixed
reply, and ``GET /v1/models`` with the one model it "serves". No model runs: the reply does not depend on the image.

    python experiments/reward_servers/fake_openai.py --port 8011 --reply "Score: 7"
    python -m htgrpo.fit experiment=shapes_ht reward=vlm_judge reward.base_url=http://127.0.0.1:8011/v1 \\
        reward.model=fake-judge trainer.max_steps=2 ...

Options: ``--latency S`` sleeps S seconds per request (a judge's compute time); ``--capacity N`` serves at most N
requests at once (the others queue, like a GPU-bound server); ``--api-key-env NAME`` requires
``Authorization: Bearer $NAME``; ``--yes-prob P`` adds ``logprobs`` with first-token candidates yes/no at
probabilities P / 1 − P; ``--score-brightness`` answers ``Score: X`` with X = 10 × the image's mean brightness
(an image-dependent reward, for benchmarks that compare updates). It stops after ``--max-requests`` requests or ``--max-seconds`` seconds (bounded load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

#: reply(request_body) -> (HTTP status, response body); the default answers ``{"choices": [{"message": ...}]}``.
ReplyFn = Callable[[dict[str, Any]], "tuple[int, dict[str, Any]]"]


def brightness_reply(body: dict[str, Any]) -> "tuple[int, dict[str, Any]]":
    """``Score: X`` with X = 10 × mean brightness (0..1) of the request's image (its PNG data URL)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    url = body["messages"][-1]["content"][0]["image_url"]["url"]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    return 200, chat_response(f"Score: {10.0 * float(pixels.mean()) / 255.0:.4f}")


def chat_response(content: str, yes_prob: float | None = None) -> dict[str, Any]:
    """A minimal chat-completions response holding ``content`` (and yes/no first-token logprobs when asked)."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}
    if yes_prob is not None:
        lp_yes = math.log(max(yes_prob, 1e-12))
        lp_no = math.log(max(1.0 - yes_prob, 1e-12))
        first = "Yes" if yes_prob >= 0.5 else "No"
        choice["logprobs"] = {"content": [{"token": first, "logprob": max(lp_yes, lp_no),
                                           "top_logprobs": [{"token": "Yes", "logprob": lp_yes},
                                                            {"token": "No", "logprob": lp_no}]}]}
    return {"id": "fake", "object": "chat.completion", "choices": [choice]}


class FakeOpenAIServer:
    """A threaded fake server; ``url`` is its API root (``http://127.0.0.1:PORT/v1``).

    Args:
        reply: called with each decoded request body, returns (status, body).
        model: the model id ``/v1/models`` lists.
        latency: seconds each chat request takes (slept while holding one of ``capacity`` slots).
        capacity: requests served at once (None = unbounded).
        api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
        port: 0 = a free port.

    ``requests`` keeps ``(headers, body)`` of every chat request, in arrival order.
    """

    def __init__(self, reply: ReplyFn, model: str = "fake-judge", latency: float = 0.0, capacity: int | None = None,
                 api_key: str | None = None, port: int = 0) -> None:
        self.reply, self.model, self.latency, self.api_key = reply, model, float(latency), api_key
        self.slots = threading.Semaphore(capacity) if capacity else None
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.max_in_flight = 0
        self._in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "invalid api key"}})
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorised():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if not self._authorised():
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                with server.lock:
                    server.requests.append((dict(self.headers.items()), body))
                server._enter()
                try:
                    if server.latency:
                        time.sleep(server.latency)
                    status, answer = server.reply(body)
                finally:
                    server._leave()
                self._send(status, answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def _enter(self) -> None:
        if self.slots is not None:
            self.slots.acquire()
        with self.lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self.lock:
            self._in_flight -= 1
        if self.slots is not None:
            self.slots.release()

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8011, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--reply", default="Score: 7", help="the assistant message of every answer")
    parser.add_argument("--model", default="fake-judge", help="the model id /v1/models lists")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    parser.add_argument("--capacity", type=int, default=0, help="requests served at once (0 = unbounded)")
    parser.add_argument("--api-key-env", default=None, help="require Bearer $NAME")
    parser.add_argument("--yes-prob", type=float, default=None, help="add yes/no first-token logprobs")
    parser.add_argument("--score-brightness", action="store_true", help="reply Score: 10 x mean image brightness")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many chat requests")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this many seconds")
    args = parser.parse_args()
    api_key = os.environ[args.api_key_env] if args.api_key_env else None

    def reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, chat_response(args.reply, args.yes_prob)

    server = FakeOpenAIServer(brightness_reply if args.score_brightness else reply, model=args.model, latency=args.latency, capacity=args.capacity or None,
                              api_key=api_key, port=args.port).start()
    what = "Score: 10 x brightness" if args.score_brightness else args.reply
    print(f"fake OpenAI-compatible server on {server.url} (model {args.model!r}, reply {what!r})", flush=True)
    def stop_on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # terminate() from a benchmark: shut down and print the count

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    start = time.monotonic()
    try:
        while len(server.requests) < args.max_requests and time.monotonic() - start < args.max_seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(f"served {len(server.requests)} chat requests in {time.monotonic() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
