"""A reward server for scorers that cannot share htgrpo's environment (HPSv3, DeQA-Score, UniPercept, the ImageReward package).

It speaks htgrpo's reward-server protocol (README "Reward server") with the standard library, Pillow and numpy only
— no htgrpo, no torch import of its own — so it runs in the scorer's own virtual environment (its own transformers /
timm pins), on its own GPU or machine. Training then uses ``reward=remote reward.url=http://HOST:PORT``.

Worked example, ImageReward (its package pins timm==0.6.13 and transformers 4.x, which htgrpo's environment cannot
take)::

    python -m venv ~/ir-env && . ~/ir-env/bin/activate && pip install image-reward pillow numpy
    python experiments/reward_servers/external_scorer.py --scorer imagereward --port 8600 --device cuda:1
    # in htgrpo's environment:
    python -m htgrpo.fit experiment=mmada_ht reward=remote reward.url=http://127.0.0.1:8600

HPSv3 the same way: ``pip install hpsv3 pillow numpy`` in its own environment, then ``--scorer hpsv3``. Other scorers
(DeQA-Score, UniPercept): add a function ``(pil_images, prompts) -> list[float]`` to ``SCORERS`` and start it with
``--scorer NAME``. ``brightness`` (mean pixel value / 255) needs nothing and
is what htgrpo's tests run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
from PIL import Image

Scorer = Callable[[list[Image.Image], list[str]], list[float]]


def brightness_scorer(device: str) -> Scorer:
    """Mean pixel value / 255: a dependency-free scorer for smoke tests."""
    return lambda images, prompts: [float(np.asarray(im, dtype=np.float64).mean() / 255.0) for im in images]


def imagereward_scorer(device: str) -> Scorer:
    """ImageReward-v1.0 (Xu et al. 2023) through its authors' package ``image-reward``."""
    import ImageReward as RM  # noqa: N813 - the package's own name

    model = RM.load("ImageReward-v1.0", device=device)

    def score(images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [float(model.score(p, im)) for im, p in zip(images, prompts)]

    return score


def hpsv3_scorer(device: str) -> Scorer:
    """HPSv3 (Ma et al. 2025, Qwen2-VL based) through its authors' package ``hpsv3`` (pins transformers 4.45.2):
    the first output column (the preference mean mu) of ``HPSv3RewardInferencer.reward``; weights
    ``MizzenAI/HPSv3`` ``HPSv3.safetensors``."""
    import torch
    from hpsv3 import HPSv3RewardInferencer

    inferencer = HPSv3RewardInferencer(device=device)

    def score(images: list[Image.Image], prompts: list[str]) -> list[float]:
        with torch.no_grad():
            logits = inferencer.reward(images, prompts)
        return [float(v) for v in logits[:, 0].float().cpu()]

    return score


SCORERS: dict[str, Callable[[str], Scorer]] = {"brightness": brightness_scorer, "imagereward": imagereward_scorer,
                                               "hpsv3": hpsv3_scorer}


def prompt_of(record: Any) -> str:
    """The prompt text of a record in htgrpo's JSON form (``{"type": ..., "prompt": ...}``) or ""."""
    return str(record.get("prompt", "")) if isinstance(record, dict) else ""


def make_handler(scorer: Scorer, name: str, token: str | None, lock: threading.Lock) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if token and self.headers.get("Authorization", "") != f"Bearer {token}":
                self._send(401, {"error": "missing or wrong bearer token"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/health":
                self._send(404, {"error": "use GET /health or POST /score"})
            elif self._authorised():
                self._send(200, {"status": "ok", "reward": name})

        def do_POST(self) -> None:  # noqa: N802
            try:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            except ValueError:
                self.close_connection = True
                self._send(400, {"error": "bad Content-Length"})
                return
            if self.path.rstrip("/") != "/score":
                self._send(404, {"error": "use GET /health or POST /score"})
                return
            if not self._authorised():
                return
            try:
                body = json.loads(raw)
                images = [Image.open(io.BytesIO(base64.b64decode(s, validate=True))).convert("RGB") for s in body["images"]]
                records = body.get("records") or [None] * len(images)
                if not images or len(records) != len(images):
                    raise ValueError("need a non-empty images list and one record per image")
            except Exception as err:  # noqa: BLE001 - any malformed request is a 400
                self._send(400, {"error": f"{type(err).__name__}: {err}"})
                return
            prompts = [prompt_of(r) for r in records]
            try:
                with lock:
                    scores = scorer(images, prompts)
                failed = 0
            except Exception:  # noqa: BLE001 - retry image by image; a failing image is null (NaN)
                scores, failed = [], 0
                for im, p in zip(images, prompts):
                    try:
                        with lock:
                            scores.append(scorer([im], [p])[0])
                    except Exception:  # noqa: BLE001
                        scores.append(None)
                        failed += 1
            clean = [s if s is not None and math.isfinite(s) else None for s in scores]
            self._send(200, {"scores": clean, "components": {}, "num_failed": failed})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="brightness")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600, help="0 = any free port")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--token", default=None, help="bearer token clients must send")
    args = parser.parse_args()
    scorer = SCORERS[args.scorer](args.device)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(scorer, args.scorer, args.token, threading.Lock()))
    server.daemon_threads = True
    print(f"scorer {args.scorer} ready: http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
