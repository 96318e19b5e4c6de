"""Load test of the reward server: requests/s and latency percentiles of ``POST /score`` on 127.0.0.1.

Starts ``htgrpo.serve.RewardServer`` in this process on a free loopback port with the ShapesWorld reward
(``reward=shapes``, GenEval partial credit + DPG), then sends ``--requests`` requests from ``--clients`` concurrent
client threads, each request ``--batch`` ground-truth ShapesWorld images with their GenEval / DPG records (through
``RemoteReward``: PNG + base64 + JSON each way). Every answer is checked against the same reward computed locally.
Reports requests/s, images/s and p50 / p99 latency per request (client side, encode + HTTP + score + decode).

    python experiments/benchmarks/reward_server.py                      # 200 requests, 4 clients, 2 images each
    python experiments/benchmarks/reward_server.py --requests 1000 --clients 8 --batch 8 --out server.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from htgrpo.data.prompt_sets import ShapesPromptStream  # noqa: E402
from htgrpo.data.shapes.palette import ShapesWorldConfig  # noqa: E402
from htgrpo.rewards.remote import RemoteReward  # noqa: E402
from htgrpo.rewards.shapes import ShapesPromptReward  # noqa: E402
from htgrpo.serve import RewardServer  # noqa: E402


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def make_batches(world: ShapesWorldConfig, n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, list[Any]]]:
    """``n`` request payloads: ``batch`` ground-truth images each, with their records (half GenEval, half DPG)."""
    stream = ShapesPromptStream(world, seed=seed, dpg_fraction=0.5, with_images=True)
    out = []
    for i in range(n):
        items = [stream[i * batch + j] for j in range(batch)]
        out.append((torch.stack([it.image for it in items]), [it.prompt.record for it in items]))
    return out


def load_test(url: str, payloads: list[tuple[torch.Tensor, list[Any]]], expected: list[torch.Tensor],
              clients: int = 4, timeout: float = 30.0) -> dict[str, Any]:
    """Send every payload once from ``clients`` threads (request i goes to thread i % clients); check each answer.

    Returns ``{"requests", "clients", "seconds", "requests_per_s", "images_per_s", "p50_ms", "p99_ms",
    "mismatches", "failures"}``.
    """
    latencies: list[float] = []
    mismatches: list[int] = []
    failures: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        client = RemoteReward(url, timeout=timeout, retry_seconds=0)
        for i in range(k, len(payloads), clients):
            images, records = payloads[i]
            t0 = time.perf_counter()
            out = client.score(images, records)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if out.num_failed:
                    failures.append(i)
                elif not torch.allclose(out.scores, expected[i], atol=1e-6, equal_nan=True):
                    mismatches.append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    n_images = sum(p[0].shape[0] for p in payloads)
    return {"requests": len(payloads), "clients": clients, "seconds": round(seconds, 3),
            "requests_per_s": round(len(payloads) / seconds, 1), "images_per_s": round(n_images / seconds, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 2), "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
            "mismatches": sorted(mismatches), "failures": sorted(failures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="images per request")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)

    world = ShapesWorldConfig.roomy()
    reward = ShapesPromptReward(world, "partial")
    payloads = make_batches(world, args.requests, args.batch)
    expected = [reward(images, records) for images, records in payloads]
    server = RewardServer("127.0.0.1", 0).start()
    server.set_reward(reward)
    try:
        result = load_test(server.url, payloads, expected, clients=args.clients)
    finally:
        server.stop()
    result.update({"batch": args.batch, "image_px": int(payloads[0][0].shape[-1]), "reward": "shapes (partial)",
                   "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()})
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
