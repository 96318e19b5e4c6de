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

It is as hardened as ``htgrpo.serve``: it loads ``htgrpo/reward_http.py`` of this clone by path (standard library
only, so nothing of htgrpo's environment is needed; copy that file beside this one if you move the script). Method,
path and token are checked before any body byte is read (constant-time compare), bodies need ``Content-Length``
(``--max-body-mb``, ``--max-inflight-mb``), images are PNG only with count and pixels checked from their headers
before decoding (``--max-images``, ``--max-pixels``, ``--max-request-pixels``), ``--decode-concurrency`` requests
decode at once, a fixed pool of ``--workers`` threads serves connections (``--max-pending`` more wait, then 503),
and a request must arrive within ``--timeout-s``. The bearer token comes from ``$HTGRPO_REWARD_TOKEN`` or
``--token-file`` (never a command-line value, which ``ps`` shows to every user).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import math
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image


def _load_reward_http() -> Any:
    """``htgrpo/reward_http.py`` (standard library only) by path: beside this file, else in this clone."""
    here = Path(__file__).resolve().parent
    for path in (here / "reward_http.py", here.parents[1] / "htgrpo" / "reward_http.py"):
        if path.exists():
            spec = importlib.util.spec_from_file_location("htgrpo_reward_http", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up by name
            spec.loader.exec_module(module)
            return module
    raise SystemExit("reward_http.py not found: copy htgrpo/reward_http.py beside this script")


rh = _load_reward_http()

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


def decode_images(images: list[str]) -> list[Image.Image]:
    """Decode checked base64 PNGs (their headers already passed ``check_png_batch``) to RGB PIL images."""
    out = []
    for i, text in enumerate(images):
        try:
            with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
                if im.format != "PNG":
                    raise rh.RequestError(400, f"images[{i}]: expected a PNG file, got {im.format}")
                out.append(im.convert("RGB"))
        except rh.RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - binascii / PIL errors of all kinds
            raise rh.RequestError(400, f"images[{i}]: not a base64 PNG ({type(err).__name__}: {err})") from None
    return out


def score_request(body: Any, scorer: Scorer, lock: threading.Lock, limits: Any) -> dict[str, Any]:
    """The ``POST /score`` answer of a parsed body (raises ``RequestError`` for a malformed one)."""
    if not isinstance(body, dict):
        raise rh.RequestError(400, "body must be a JSON object {images: [...], records: [...]}")
    rh.check_png_batch(body.get("images"), limits)
    images_b64 = body["images"]
    records = body.get("records") or [None] * len(images_b64)
    if not isinstance(records, list) or len(records) != len(images_b64):
        raise rh.RequestError(400, f"records must be a list with one entry per image ({len(images_b64)})")
    images = decode_images(images_b64)
    prompts = [prompt_of(r) for r in records]
    try:
        with lock:
            scores = list(scorer(images, prompts))
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
    clean = [float(s) if s is not None and math.isfinite(s) else None for s in scores]
    return {"scores": clean, "components": {}, "num_failed": failed}


def make_handler(scorer: Scorer, name: str, guard: Any, lock: threading.Lock) -> type:
    class Handler(rh.GuardedHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.allowed("/health"):
                self.send_json(200, {"status": "ok", "reward": name,
                                     "limits": {**guard.limits.as_json(), "max_body_bytes": guard.max_body_bytes}},
                               close=self.has_body())

        def do_POST(self) -> None:  # noqa: N802
            if not self.allowed("/score"):
                return
            got = self.read_json_body()
            if got is None:
                return
            body, reserved = got
            try:
                if not guard.decode_slots.acquire(timeout=guard.timeout_s):
                    self.send_json(503, {"error": "server busy; retry"}, extra={"Retry-After": "1"})
                    return
                try:
                    code, answer = 200, score_request(body, scorer, lock, guard.limits)
                except rh.RequestError as err:
                    code, answer = err.status, {"error": err.message}
                finally:
                    guard.decode_slots.release()
            finally:
                del body
                guard.body_budget.release(reserved)
            self.send_json(code, answer)

    Handler.guard = guard
    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="brightness")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600, help="0 = any free port")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--token-file", default=None,
                        help=f"file holding the bearer token clients must send (default: ${rh.TOKEN_ENV}, unset = none)")
    parser.add_argument("--max-images", type=int, default=256, help="most images per request (400 above)")
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048, help="most pixels per image (413 above)")
    parser.add_argument("--max-request-pixels", type=int, default=64 * 2**20,
                        help="most pixels of all images of one request (413 above)")
    parser.add_argument("--max-body-mb", type=float, default=320.0, help="largest request body in MiB (413 above)")
    parser.add_argument("--max-inflight-mb", type=float, default=1024.0, help="MiB of bodies held at once")
    parser.add_argument("--decode-concurrency", type=int, default=2, help="requests decoding + scoring at once")
    parser.add_argument("--workers", type=int, default=32, help="threads serving connections")
    parser.add_argument("--max-pending", type=int, default=64, help="connections waiting for a thread (503 above)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="seconds a request may take to arrive")
    args = parser.parse_args()
    for flag in ("max_images", "max_pixels", "max_request_pixels", "decode_concurrency", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_pending < 0 or args.timeout_s <= 0 or args.max_body_mb <= 0 or args.max_inflight_mb < args.max_body_mb:
        parser.error("need --max-pending >= 0, --timeout-s > 0, --max-body-mb > 0, --max-inflight-mb >= --max-body-mb")
    try:
        token = rh.load_token(args.token_file)
    except rh.TokenError as err:
        parser.error(f"--token-file: {err}")
    guard = rh.ServerGuard(token=token, timeout_s=args.timeout_s, max_body_bytes=int(args.max_body_mb * 2**20),
                           max_inflight_bytes=int(args.max_inflight_mb * 2**20),
                           decode_concurrency=args.decode_concurrency,
                           limits=rh.ImageLimits(args.max_images, args.max_pixels, args.max_request_pixels))
    scorer = SCORERS[args.scorer](args.device)
    server = rh.BoundedHTTPServer((args.host, args.port), make_handler(scorer, args.scorer, guard, threading.Lock()),
                                  workers=args.workers, max_pending=args.max_pending)
    print(f"scorer {args.scorer} ready: http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
