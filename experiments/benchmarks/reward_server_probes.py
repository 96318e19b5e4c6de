"""Figures of the hardened reward server (issue 18): load, soak, bad-input probes and fault runs, all on 127.0.0.1.

Each mode starts ``python -m htgrpo.serve reward=shapes`` as a subprocess on a free loopback port (so its memory is
its own: RSS from ``/proc/PID/status``), drives it from this process, stops it, and prints a JSON result (also
written with ``--out``). Every loop is bounded in count and time.

    python experiments/benchmarks/reward_server_probes.py load  --clients 16 --requests 10000
    python experiments/benchmarks/reward_server_probes.py soak  --minutes 10 --clients 4 --rate 100
    python experiments/benchmarks/reward_server_probes.py probes
    python experiments/benchmarks/reward_server_probes.py fault

* ``load``: ``--clients`` threads send ``--requests`` requests in all (``--batch`` ShapesWorld images each, from a
  pool of ``--distinct`` payloads); every answer is checked against the reward computed locally. p50 / p99 latency
  (client side: encode, HTTP, score, decode), requests/s, mismatches, failures, server RSS and threads before/after.
* ``soak``: the same checked load, ``--clients`` threads for ``--minutes`` minutes at a steady ``--rate`` requests/s;
  server RSS sampled every ``--sample-s`` seconds (start, end, max), latency per minute.
* ``probes``: the probe table of issue 18 plus more, against a server with a token, ``serve.timeout_s=10`` and the
  default limits; each probe's status and seconds, RSS before / max / after, threads during the slow-connection probe.
* ``fault``: two short ``python -m htgrpo.fit experiment=shapes_ht reward=remote`` runs (tiny policy) with the token
  in ``$HTGRPO_REWARD_TOKEN`` on both sides: (a) the server is killed (SIGKILL) after 2 scored requests and restarted
  on the same port ``--down-s`` later, within ``reward.retry_seconds``: the run must finish with
  ``train/nonfinite_rewards`` 0 on every step; (b) killed and left down: the run must stop with "Reward unavailable"
  and ``checkpoints/reward_unavailable.ckpt``. Also: the token appears in no file of either run folder.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling load test's percentile

import torch  # noqa: E402

from htgrpo.data.shapes.palette import ShapesWorldConfig  # noqa: E402
from htgrpo.reward_http import TOKEN_ENV  # noqa: E402
from htgrpo.rewards.remote import RemoteReward  # noqa: E402
from htgrpo.rewards.shapes import ShapesPromptReward  # noqa: E402
from reward_server import make_batches, percentile  # noqa: E402


def _conf_world() -> ShapesWorldConfig:
    """conf/world/shapes.yaml, the world `python -m htgrpo.serve reward=shapes` scores with (110 px images)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(REPO / "conf" / "world" / "shapes.yaml"))


WORLD = _conf_world()


# ---- the server process ---------------------------------------------------------------------------------------
class ServerProcess:
    """``python -m htgrpo.serve reward=shapes serve.port=PORT ...`` as a subprocess (its output in ``log``)."""

    def __init__(self, workdir: Path, port: int = 0, overrides: tuple[str, ...] = (), token: str | None = None):
        env = dict(os.environ, HTGRPO_ROOT=str(workdir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO))
        env.pop(TOKEN_ENV, None)
        if token:
            env[TOKEN_ENV] = token
        self.log = workdir / f"server_{int(time.time() * 1000)}.log"
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "htgrpo.serve", "reward=shapes", f"serve.port={port}",
                                      *overrides], cwd=workdir, env=env, stdout=self._fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            match = re.search(r"ready in .*?: (http://127\.0\.0\.1:(\d+))", self.log.read_text())
            if match:
                self.url, self.port = match.group(1), int(match.group(2))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"reward server did not start:\n{self.log.read_text()[-2000:]}")

    def status(self, field: str) -> int:
        """A number from /proc/PID/status: ``VmRSS`` (KiB) or ``Threads``."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))

    def rss_mb(self) -> float:
        return round(self.status("VmRSS") / 1024, 1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._fh.close()


# ---- checked load -----------------------------------------------------------------------------------------------
def checked_load(url: str, payloads: list, expected: list[torch.Tensor], clients: int, total: int | None,
                 seconds: float | None, token: str | None = None, rate: float = 0.0,
                 on_tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Send requests from ``clients`` threads until ``total`` are sent or ``seconds`` have passed (whichever is
    given; both bound the loop); request k uses payload k mod len(payloads) and is not sent before k / ``rate``
    seconds (``rate`` 0: as fast as answers come); every answer is checked."""
    if token:
        os.environ[TOKEN_ENV] = token
    latencies: list[tuple[float, float]] = []  # (time since start, seconds)
    mismatches, failures = [], []
    lock = threading.Lock()
    counter = iter(range(total if total is not None else 10**9))
    t_start = time.perf_counter()
    stop_at = t_start + (seconds if seconds is not None else 3600.0)

    def worker() -> None:
        client = RemoteReward(url, timeout=30, retry_seconds=0)
        while time.perf_counter() < stop_at:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            if rate > 0:  # steady load: request k is due k / rate seconds after the start
                time.sleep(max(0.0, t_start + k / rate - time.perf_counter()))
            images, records = payloads[k % len(payloads)]
            t0 = time.perf_counter()
            out = client.score(images, records)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append((t0 - t_start, dt))
                if out.num_failed:
                    failures.append(k)
                elif not torch.allclose(out.scores, expected[k % len(payloads)], atol=1e-6, equal_nan=True):
                    mismatches.append(k)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if on_tick:
            on_tick()
    wall = time.perf_counter() - t_start
    lat = [dt for _, dt in latencies]
    return {"requests": len(lat), "clients": clients, "seconds": round(wall, 1),
            "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * percentile(lat, 0.5), 2), "p99_ms": round(1000 * percentile(lat, 0.99), 2),
            "max_ms": round(1000 * max(lat), 1), "mismatches": len(mismatches), "failures": len(failures),
            "_latencies": latencies}


def mode_load(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    payloads = make_batches(WORLD, args.distinct, args.batch)
    reward = ShapesPromptReward(WORLD, "partial")
    expected = [reward(im, rec) for im, rec in payloads]
    server = ServerProcess(workdir)
    try:
        before = {"rss_mb": server.rss_mb(), "threads": server.status("Threads")}
        peak = {"rss_mb": before["rss_mb"], "threads": before["threads"]}

        def tick() -> None:
            peak["rss_mb"] = max(peak["rss_mb"], server.rss_mb())
            peak["threads"] = max(peak["threads"], server.status("Threads"))

        result = checked_load(server.url, payloads, expected, args.clients, args.requests, args.max_seconds,
                              on_tick=tick)
        after = {"rss_mb": server.rss_mb(), "threads": server.status("Threads")}
    finally:
        server.kill()
    result.pop("_latencies")
    return {"mode": "load", **result, "batch": args.batch, "image_px": WORLD.grid_size * WORLD.cell_px,
            "server_before": before, "server_peak": peak, "server_after": after}


def mode_soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    payloads = make_batches(WORLD, args.distinct, args.batch)
    reward = ShapesPromptReward(WORLD, "partial")
    expected = [reward(im, rec) for im, rec in payloads]
    server = ServerProcess(workdir)
    samples: list[tuple[float, float, int]] = []
    t0 = time.perf_counter()
    last = [-1e9]

    def tick() -> None:
        now = time.perf_counter() - t0
        if now - last[0] >= args.sample_s:
            last[0] = now
            samples.append((round(now, 1), server.rss_mb(), server.status("Threads")))

    try:
        tick()
        result = checked_load(server.url, payloads, expected, args.clients, None, 60.0 * args.minutes,
                              rate=args.rate, on_tick=tick)
        last[0] = -1e9
        tick()
    finally:
        server.kill()
    lat = result.pop("_latencies")
    per_minute = []
    for m in range(int(args.minutes + 0.999)):
        mine = [dt for t, dt in lat if m * 60 <= t < (m + 1) * 60]
        if mine:
            per_minute.append({"minute": m + 1, "requests": len(mine), "p50_ms": round(1000 * percentile(mine, 0.5), 2),
                               "p99_ms": round(1000 * percentile(mine, 0.99), 2)})
    rss = [r for _, r, _ in samples]
    return {"mode": "soak", **result, "minutes": args.minutes, "batch": args.batch, "rate": args.rate,
            "rss_mb_start": rss[0], "rss_mb_end": rss[-1], "rss_mb_max": max(rss),
            "threads_max": max(t for _, _, t in samples), "rss_samples": samples, "per_minute": per_minute}


# ---- bad-input probes -------------------------------------------------------------------------------------------
def _png(im: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _ihdr_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def raw_request(port: int, head: bytes, body: bytes = b"", body_after_answer_s: float = 0.0,
                wait: float = 40.0) -> dict[str, Any]:
    """Send ``head`` (request line + headers); then ``body``, or, with ``body_after_answer_s``, first wait that long
    for an answer and send the body only if none came. Returns status, seconds, and body bytes sent."""
    t0 = time.perf_counter()
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head)
        if body_after_answer_s:
            sock.settimeout(body_after_answer_s)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                pass
            sock.settimeout(wait)
        if not answer and body:
            try:
                for i in range(0, len(body), 1 << 20):
                    sock.sendall(body[i:i + (1 << 20)])
                    sent += len(body[i:i + (1 << 20)])
            except OSError:
                pass
        try:
            while not answer.count(b"\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (TimeoutError, OSError):
            pass
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.") else None
    return {"status": status, "seconds": round(time.perf_counter() - t0, 3), "body_bytes_sent": sent,
            "answer": answer.split(b"\r\n\r\n", 1)[-1][:120].decode("utf-8", "replace")}


def _head(method: str = "POST", path: str = "/score", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_probe(port: int, obj: Any, token: str | None, content_type: str = "application/json") -> dict[str, Any]:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return raw_request(port, _head(headers=headers), body)


def slow_connections(port: int, n: int, seconds: float, server: ServerProcess) -> dict[str, Any]:
    """``n`` connections each sending one header byte every second for up to ``seconds``: when was each closed by
    the server, and the server's thread count meanwhile."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    t0 = time.perf_counter()
    closed: dict[int, float] = {}
    threads_max = 0
    while len(closed) < n and time.perf_counter() - t0 < seconds:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                s.settimeout(0.01)
                if s.recv(4096) is not None:
                    closed[i] = time.perf_counter() - t0
            except TimeoutError:
                try:
                    s.sendall(b"X")
                except OSError:
                    closed[i] = time.perf_counter() - t0
            except OSError:
                closed[i] = time.perf_counter() - t0
        threads_max = max(threads_max, server.status("Threads"))
        time.sleep(1.0)
    for s in socks:
        s.close()
    return {"connections": n, "closed": len(closed), "last_closed_s": round(max(closed.values()), 1) if closed else None,
            "server_threads_max": threads_max}


def mode_probes(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from PIL import Image
    import numpy as np

    token = "probe-token-7f3a"
    timeout_s = 10
    server = ServerProcess(workdir, overrides=(f"serve.timeout_s={timeout_s}",), token=token)
    port = server.port
    rows: list[dict[str, Any]] = []
    rss = {"before": server.rss_mb(), "max": server.rss_mb()}

    def probe(name: str, expected: str, fn: Callable[[], dict[str, Any]]) -> None:
        result = fn()
        rss["max"] = max(rss["max"], server.rss_mb())
        rows.append({"probe": name, "expected": expected, **result})
        print(f"{result.get('status')!s:>5}  {result.get('seconds', '')!s:>7} s  {name}", flush=True)

    one_bit = _png(Image.new("1", (9000, 9000)))
    b64_bit = base64.b64encode(one_bit).decode()
    small = base64.b64encode(_png(Image.fromarray(np.zeros((16, 16, 3), np.uint8)))).decode()
    noise = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        probe(f"issue: valid {len(one_bit) / 1000:.1f} KB one-bit PNG of 9000x9000", "413 (max_pixels)",
              lambda: _json_probe(port, {"images": [b64_bit]}, token))
        probe("issue: 256 such images in one request (20.7 Gpx claimed)", "413",
              lambda: _json_probe(port, {"images": [b64_bit] * 256}, token))
        body50 = b" " * (50 * 10**6)
        probe("issue: wrong token, 50 MB body (body sent only if no answer within 1 s)", "401, 0 body bytes read",
              lambda: raw_request(port, _head(headers={**auth, "Authorization": "Bearer wrong",
                                                       "Content-Length": str(len(body50))}), body50,
                                  body_after_answer_s=1.0))
        probe("issue: 100,000 nested [", "400", lambda: _json_probe(port, b"[" * 100_000, token))
        probe("100,000 nested {\"a\":", "400", lambda: _json_probe(port, b'{"a":' * 100_000, token))
        probe("IHDR claims 65535x65535 (header only)", "413",
              lambda: _json_probe(port, {"images": [base64.b64encode(_ihdr_only(65535, 65535)).decode()]}, token))
        probe("request pixel budget: 17 x 2048^2 headers (> 64 Mi px)", "413",
              lambda: _json_probe(port, {"images": [base64.b64encode(_ihdr_only(2048, 2048)).decode()] * 17}, token))
        probe("257 images (> serve.max_images)", "400", lambda: _json_probe(port, {"images": [small] * 257}, token))
        probe("truncated PNG (first 1,500 bytes of a 64x64 noise PNG)", "400",
              lambda: _json_probe(port, {"images": [base64.b64encode(noise[:1500]).decode()]}, token))
        jpeg = io.BytesIO()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(jpeg, format="JPEG")
        probe("JPEG instead of PNG", "400",
              lambda: _json_probe(port, {"images": [base64.b64encode(jpeg.getvalue()).decode()]}, token))
        probe("not base64", "400", lambda: _json_probe(port, {"images": ["@@@@"]}, token))
        probe("integer of 100,000 digits", "400", lambda: _json_probe(port, b'{"images": ' + b"9" * 100_000 + b"}",
                                                                      token))
        probe("invalid UTF-8", "400", lambda: _json_probe(port, b'{"images": ["\xff\xfe"]}', token))
        probe("wrong Content-Type (text/plain)", "415",
              lambda: _json_probe(port, {"images": [small]}, token, content_type="text/plain"))
        probe("Content-Length 10^12, no body", "413",
              lambda: raw_request(port, _head(headers={**auth, "Content-Length": str(10**12)})))
        probe(f"Content-Length 1000, body never sent (serve.timeout_s={timeout_s})", "408 after the timeout",
              lambda: raw_request(port, _head(headers={**auth, "Content-Length": "1000"})))
        probe("no Content-Length", "411", lambda: raw_request(port, _head(headers=auth)))
        probe("negative Content-Length", "400", lambda: raw_request(port, _head(headers={**auth, "Content-Length": "-1"})))
        probe("chunked Transfer-Encoding", "411",
              lambda: raw_request(port, _head(headers={**auth, "Transfer-Encoding": "chunked"}), b"2\r\n{}\r\n0\r\n\r\n"))
        probe("Expect: 100-continue with a wrong token", "401 (no 100 Continue)",
              lambda: raw_request(port, _head(headers={**auth, "Authorization": "Bearer x", "Content-Length": "10",
                                                       "Expect": "100-continue"})))
        probe("path traversal GET /../../etc/passwd", "404",
              lambda: raw_request(port, _head("GET", "/../../etc/passwd", {"Authorization": f"Bearer {token}"})))
        probe("encoded traversal GET /health/..%2f..%2fetc%2fpasswd", "404",
              lambda: raw_request(port, _head("GET", "/health/..%2f..%2fetc%2fpasswd",
                                              {"Authorization": f"Bearer {token}"})))
        probe("method DELETE", "405", lambda: raw_request(port, _head("DELETE", "/score", auth)))
        probe("made-up method BREW", "405", lambda: raw_request(port, _head("BREW", "/score", auth)))
        probe("header line of 70,000 bytes", "431",
              lambda: raw_request(port, _head(headers={**auth, "X-Big": "a" * 70_000})))
        probe("101 header lines", "431",
              lambda: raw_request(port, _head(headers={**auth, **{f"X-{i}": "1" for i in range(101)}})))
        probe("request line of 70,000 bytes", "414", lambda: raw_request(port, _head("GET", "/" + "a" * 70_000)))
        probe("no token on GET /health", "401", lambda: raw_request(port, _head("GET", "/health")))
        slow = slow_connections(port, 50, 25.0 + timeout_s, server)
        rows.append({"probe": f"issue: 50 slow connections (one header byte / s), serve.timeout_s={timeout_s}",
                     "expected": "all closed within the timeout; threads bounded by serve.workers", **slow})
        print(json.dumps(rows[-1]), flush=True)
        flood: list[int | None] = []

        def flood_one() -> None:
            flood.append(raw_request(port, _head("GET", "/health", {"Authorization": "Bearer " + token}),
                                     wait=15.0)["status"])

        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]  # hold 100 idle connections
        time.sleep(0.5)
        threads = [threading.Thread(target=flood_one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        threads_now = server.status("Threads")
        for h in holders:
            h.close()
        rows.append({"probe": "100 idle connections held, then 20 requests", "expected":
                     "503 at once beyond serve.workers + serve.max_pending (32 + 64 = 96)",
                     "statuses": {str(k): flood.count(k) for k in sorted(set(flood), key=str)},
                     "server_threads": threads_now})
        print(json.dumps(rows[-1]), flush=True)
        time.sleep(timeout_s + 1)
        ok = _json_probe(port, {"images": [small]}, token)
        rows.append({"probe": "a valid request after all probes", "expected": "200", **ok})
        rss["after"] = server.rss_mb()
        rss["max"] = max(rss["max"], rss["after"])
    finally:
        server.kill()
    # a token as a config value is refused (and Hydra never got to write it)
    env = dict(os.environ, HTGRPO_ROOT=str(workdir / "token_cfg"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "htgrpo.serve", "+serve.token=leaked-secret", "serve.port=0"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    leaked = [str(p) for p in (workdir / "token_cfg").rglob("*") if p.is_file() and "leaked-secret" in
              p.read_text(errors="replace")]
    rows.append({"probe": "serve.token=... on the command line", "expected": "refused at start-up",
                 "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                 "message": (proc.stderr.strip().splitlines() or [""])[-1][:300],
                 "files_holding_the_token": leaked})
    return {"mode": "probes", "rss_mb": rss, "rows": rows}


# ---- fault runs -------------------------------------------------------------------------------------------------
FIT = ["experiment=shapes_ht", "policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
       "data.batch_size=2", "algorithm.num_generations=4", "sampler.num_steps=4", "benchmark.prompts.per_task=1",
       "benchmark.images_per_prompt=1", "callbacks.progress_bar=null", "algorithm.stages.n_global=1",
       "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1", "validate_at_start=false",
       "validate_at_end=false", "logger=csv", "trainer.log_every_n_steps=1"]


def _fit(workdir: Path, url: str, token: str, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HTGRPO_ROOT=str(workdir), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env[TOKEN_ENV] = token
    out = open(workdir / "fit.log", "w")
    return subprocess.Popen([sys.executable, "-m", "htgrpo.fit", *FIT, "reward=remote", f"reward.url={url}", *extra],
                            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def _served(url: str, token: str) -> int:
    os.environ[TOKEN_ENV] = token
    try:
        return int(RemoteReward(url, timeout=2).health().get("requests_served", 0))
    except Exception:  # noqa: BLE001 - down or restarting
        return -1


def _fault_run(root: Path, token: str, down_s: float | None, steps: int, extra: list[str]) -> dict[str, Any]:
    workdir = root / ("restart" if down_s is not None else "down")
    workdir.mkdir(parents=True)
    server = ServerProcess(workdir, token=token)
    fit = _fit(workdir, server.url, token, [f"trainer.limit_train_batches={steps}", *extra])
    t0 = time.time()
    events = []
    try:
        while _served(server.url, token) < 2 and fit.poll() is None and time.time() - t0 < 600:
            time.sleep(0.2)
        server.kill()
        events.append(f"{time.time() - t0:.1f} s: server killed (SIGKILL) after 2 scored requests")
        if down_s is not None:
            time.sleep(down_s)
            server = ServerProcess(workdir, port=server.port, token=token)
            events.append(f"{time.time() - t0:.1f} s: server restarted on port {server.port}")
        fit.wait(timeout=900)
        events.append(f"{time.time() - t0:.1f} s: fit exited with {fit.returncode}")
    finally:
        if fit.poll() is None:
            fit.kill()
        server.kill()
    runs = sorted((workdir / "logs").glob("*/runs/*"))
    if not runs:
        raise RuntimeError(f"the fit left no run folder; its output:\n{(workdir / 'fit.log').read_text()[-3000:]}")
    run_dir = runs[-1]
    metrics = run_dir / "csv" / "metrics.csv"
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("train/nonfinite_rewards")] if metrics.exists() else []
    log_tail = (workdir / "fit.log").read_text().strip().splitlines()
    leaked = [str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file() and p.suffix != ".ckpt"
              and token in p.read_text(errors="replace")]
    return {"down_s": down_s, "events": events, "exit_code": fit.returncode,
            "nonfinite_rewards_per_step": [float(r["train/nonfinite_rewards"]) for r in rows],
            "update_skipped_per_step": [float(r.get("train/update_skipped") or 0) for r in rows],
            "checkpoint": [str(p.relative_to(workdir)) for p in run_dir.glob("checkpoints/reward_unavailable.ckpt")],
            "last_line": log_tail[-1][:600] if log_tail else "", "files_holding_the_token": leaked,
            "hydra_files": sorted(p.name for p in (run_dir / ".hydra").glob("*.yaml"))}


def mode_fault(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    token = "fault-token-91c2"
    restart = _fault_run(workdir, token, args.down_s, 6, [f"reward.retry_seconds={args.retry_seconds}"])
    down = _fault_run(workdir, token, None, 12, ["reward.retry_seconds=15", "reward.max_failed_batches=2"])
    return {"mode": "fault", "restart_within_retry_window": restart, "left_down": down}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["load", "soak", "probes", "fault"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10_000, help="load: requests in all")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="load: stop after this long regardless")
    parser.add_argument("--batch", type=int, default=1, help="images per request (110 px ShapesWorld images)")
    parser.add_argument("--distinct", type=int, default=256, help="distinct payloads cycled through")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: duration")
    parser.add_argument("--sample-s", type=float, default=30.0, help="soak: RSS sampling period")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="soak: requests per second in all (steady load; 0 = as fast as answered)")
    parser.add_argument("--down-s", type=float, default=8.0, help="fault: seconds the server stays down")
    parser.add_argument("--retry-seconds", type=float, default=120.0, help="fault: reward.retry_seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=f"reward_{args.mode}_") as tmp:
        result = {"load": mode_load, "soak": mode_soak, "probes": mode_probes, "fault": mode_fault}[args.mode](
            args, Path(tmp))
    result.update({"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count()})
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
