"""The reward server and its client on 127.0.0.1: protocol, bad input (every probe of issue 18 in small form),
timeouts, tokens, the client failing fast at start-up, retrying through a restart, and stopping a fit whose reward
server stays down."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from htgrpo.data.prompt_sets import ShapesPromptStream
from htgrpo.data.records import record_from_json, record_to_json
from htgrpo.data.shapes.palette import ShapesWorldConfig
from htgrpo.config import ConfigError
from htgrpo.reward_http import TOKEN_ENV
from htgrpo.rewards.base import RewardUnavailableError
from htgrpo.rewards.remote import RemoteReward, build_request
from htgrpo.rewards.shapes import ShapesPromptReward
from htgrpo.serve import RewardServer

WORLD = ShapesWorldConfig.roomy()


def _without_hydra(cfg):
    """A composed config as ``htgrpo.fit.run`` gets it inside ``@hydra.main`` (no ``hydra`` node to log)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _bench():
    spec = importlib.util.spec_from_file_location("reward_server_bench", REPO_ROOT / "experiments/benchmarks/reward_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def server():
    srv = RewardServer("127.0.0.1", 0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_server():
    """One server (at most 4 images a request) shared by the bad-input cases."""
    srv = RewardServer("127.0.0.1", 0, max_images=4).start()
    srv.set_reward(ShapesPromptReward(WORLD))
    yield srv
    srv.stop()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/score", data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str, path: str = "/health", headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", headers=headers or {}), timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_records_round_trip_through_json():
    stream = ShapesPromptStream(WORLD, seed=2, dpg_fraction=0.5)
    records = [stream[i].prompt.record for i in range(12)] + ["a red cube", None]
    assert {type(r).__name__ for r in records} >= {"GenEvalRecord", "DPGItem", "str", "NoneType"}
    wire = json.loads(json.dumps([record_to_json(r) for r in records]))
    assert [record_from_json(r) for r in wire] == records


def test_health_is_503_while_loading_then_200(server):
    assert _get(server.url) == (503, {"status": "loading"})
    server.set_reward(ShapesPromptReward(WORLD))
    code, answer = _get(server.url)
    assert code == 200 and answer["status"] == "ok" and answer["reward"] == "shapes"
    assert answer["limits"] == {"max_images": 256, "max_pixels": 2048**2, "max_request_pixels": 64 * 2**20,
                                "max_body_bytes": 320 * 2**20}
    assert _get(server.url, "/nope")[0] == 404


def test_load_test_200_requests_4_clients_every_answer_checked(server):
    bench = _bench()
    reward = ShapesPromptReward(WORLD, "partial")
    server.set_reward(reward)
    payloads = bench.make_batches(WORLD, 200, 2)
    expected = [reward(images, records) for images, records in payloads]
    result = bench.load_test(server.url, payloads, expected, clients=4)
    print(json.dumps(result))
    assert result["requests"] == 200 and server.requests_served == 200
    assert result["mismatches"] == [] and result["failures"] == []
    assert result["p99_ms"] >= result["p50_ms"] > 0
    # components travel too (GenEval items have geneval/*, DPG items dpg/score; NaN where they do not apply)
    images, records = payloads[0]
    out = RemoteReward(server.url).score(images, records)
    local = reward.score(images, records)
    assert set(out.components) == set(local.components)
    for k in out.components:
        assert torch.allclose(out.components[k], local.components[k], equal_nan=True)


def _png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _png_b64_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png_b64(array) -> str:
    return _png_b64_bytes(_png_bytes(array))


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "Expecting"),
    (b"[1, 2]", "JSON object"),
    (b'{"images": []}', "non-empty list"),
    (b'{"images": ["@@@"]}', "images[0]: not a base64 PNG"),
    (b'{"images": ["aGVsbG8="]}', "images[0]: not a PNG file"),
    (b'{"images": ["x"], "records": [], "extra": 1}', "unknown keys ['extra']"),
    ("norecords", "one entry per image"),
    ("jpeg", "images[0]: not a PNG file"),
    ("truncated", "images[0]: not a base64 PNG"),
    ("sizes", "one size"),
    ("record", "records[0]"),
    ("toomany", "takes at most 4"),
])
def test_malformed_requests_get_400_with_the_reason_and_the_server_keeps_serving(small_server, body, reason):
    import numpy as np

    srv = small_server
    if True:
        small, big = np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)
        if body == "jpeg":
            buf = io.BytesIO()
            Image.fromarray(small).save(buf, format="JPEG")
            body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
        elif body == "sizes":
            body = json.dumps({"images": [_png_b64(small), _png_b64(big)]}).encode()
        elif body == "record":
            body = json.dumps({"images": [_png_b64(small)], "records": [{"type": "geneval", "tag": "nope"}]}).encode()
        elif body == "norecords":
            body = json.dumps({"images": [_png_b64(small)], "records": []}).encode()
        elif body == "truncated":  # a real PNG header, then the file stops
            noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            body = json.dumps({"images": [_png_b64_bytes(_png_bytes(noise)[:1500])]}).encode()
        elif body == "toomany":
            body = json.dumps({"images": [_png_b64(small)] * 5}).encode()
        code, answer = _post(srv.url, body)
        assert code == 400 and reason in answer["error"], answer
        # still serving
        assert _get(srv.url)[0] == 200
        good = build_request(torch.zeros(1, 3, 128, 128, dtype=torch.uint8), [ShapesPromptStream(WORLD, seed=0)[0].prompt.record])
        assert _post(srv.url, json.dumps(good).encode())[0] == 200


def test_bearer_token_is_enforced(monkeypatch, tmp_path):
    srv = RewardServer("127.0.0.1", 0, token="s3cret").start()
    try:
        srv.set_reward(ShapesPromptReward(WORLD))
        assert _get(srv.url)[0] == 401
        assert _get(srv.url, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _get(srv.url, headers={"Authorization": "Bearer s3cret"})[0] == 200
        images = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
        records = [ShapesPromptStream(WORLD, seed=0)[i].prompt.record for i in range(2)]
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        assert RemoteReward(srv.url, retry_seconds=0).score(images, records).num_failed == 2  # no token: refused
        monkeypatch.setenv(TOKEN_ENV, "s3cret")  # the token from the environment ...
        out = RemoteReward(srv.url).score(images, records)
        assert out.num_failed == 0 and torch.equal(out.scores, ShapesPromptReward(WORLD)(images, records))
        monkeypatch.setenv(TOKEN_ENV, "wrong")   # ... or from a file, which wins over the environment
        (tmp_path / "token").write_text("s3cret\n")
        client = RemoteReward(srv.url, token_file=str(tmp_path / "token"))
        assert client.score(images, records).num_failed == 0 and "s3cret" not in repr(client)
    finally:
        srv.stop()


def test_client_gives_nan_when_nothing_listens():
    srv = RewardServer("127.0.0.1", 0)
    url = srv.url
    srv.httpd.server_close()  # the port is free again: connection refused
    t0 = time.perf_counter()
    client = RemoteReward(url, timeout=2, retry_seconds=1.0, retry_wait=0.05, max_retry_wait=0.1)
    out = client.score(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), [None] * 3)
    assert out.num_failed == 3 and torch.isnan(out.scores).all()
    assert 0.9 <= time.perf_counter() - t0 < 5  # retried for about retry_seconds, then gave up
    assert "ConnectionRefusedError" in client.last_failure and "tries" in client.last_failure
    t0 = time.perf_counter()  # the same outage, past its window: one try, no waiting
    assert client.score(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [None]).num_failed == 1
    assert time.perf_counter() - t0 < 0.3


def test_an_external_scorer_speaking_the_protocol_works_with_the_client(tmp_path):
    """The worked example for scorers that live in their own environment (ImageReward, HPSv3 ...)."""
    script = REPO_ROOT / "experiments" / "reward_servers" / "external_scorer.py"
    proc = subprocess.Popen([sys.executable, str(script), "--scorer", "brightness", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # "scorer brightness ready: http://127.0.0.1:PORT"
        assert "ready" in line, line
        url = line.split("ready: ")[1].strip()
        client = RemoteReward(url, retry_seconds=0)
        assert client.health()["reward"] == "brightness"
        images = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        records = [ShapesPromptStream(WORLD, seed=0)[0].prompt.record, "a prompt", None]
        out = client.score(images, records)
        assert out.num_failed == 0
        assert torch.allclose(out.scores, images.double().mean(dim=(1, 2, 3)).float() / 255, atol=1e-6)
        assert _post(url, b"{bad")[0] == 400 and client.health()["status"] == "ok"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_official_geneval_and_dpg_records_round_trip_through_json(shared_data):
    from htgrpo.data.loaders import load_dpg_prompts, load_geneval_metadata

    records = load_geneval_metadata(shared_data / "geneval" / "evaluation_metadata.jsonl")
    records += load_dpg_prompts(shared_data / "dpg_bench" / "prompts")[:50]
    wire = json.loads(json.dumps([record_to_json(r) for r in records]))
    assert [record_from_json(r) for r in wire] == records
    # the GenEval form is the official metadata line plus "type"
    first = json.loads((shared_data / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in wire[0].items() if k != "type"} == first


def test_a_scorer_exception_on_the_server_becomes_null_scores(server):
    class Picky(ShapesPromptReward):
        def score(self, images, records):
            if any(r is None for r in records):
                raise RuntimeError("no record")
            return super().score(images, records)

    server.set_reward(Picky(WORLD))
    records = [ShapesPromptStream(WORLD, seed=0)[0].prompt.record, None]
    images = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
    code, answer = _post(server.url, json.dumps(build_request(images, records)).encode())
    assert code == 200 and answer["scores"][1] is None and answer["num_failed"] == 1
    assert answer["scores"][0] == ShapesPromptReward(WORLD)(images[:1], records[:1]).item()
    out = RemoteReward(server.url).score(images, records)
    assert math.isnan(out.scores[1]) and out.num_failed == 1


# ---- hardening: every probe class of issue 18, small ------------------------------------------------------------
def _ihdr_png(width: int, height: int) -> bytes:
    """The first bytes of a PNG that claims ``width`` x ``height`` RGB pixels (signature + IHDR, no pixel data):
    the header check must refuse it without anything being decoded."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def _raw(port: int, data: bytes, wait: float = 10.0) -> tuple[int | None, bytes, float]:
    """Send raw bytes on a fresh connection, read until the server closes it (or ``wait`` s): (status or None,
    answer, seconds)."""
    import socket

    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"Content-Length" in answer:
                    head, _, rest = answer.partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(rest) >= length:
                        break
        except TimeoutError:
            pass
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.") else None
    return status, answer, time.perf_counter() - t0


def _post_raw(headers: dict[str, str], body: bytes = b"", path: str = "/score", method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json_req(obj: Any, token: str | None = "tok", content_type: str = "application/json") -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return _post_raw(headers, body)


_SMALL = None


def _small_png() -> str:
    import numpy as np

    global _SMALL
    _SMALL = _SMALL or _png_b64(np.zeros((8, 8, 3), np.uint8))
    return _SMALL


#: (probe name, raw request, expected status). Limits of the probed servers: 4 images, 4096 px per image, 10,000 px
#: per request, 1 MiB body, timeout 1.5 s, token "tok".
PROBES: list[tuple[str, Any, int]] = [
    ("image header claims 9000x9000 (1 bit, would decode to 81 Mpx)", lambda: _json_req(
        {"images": [_png_b64_bytes(_ihdr_png(9000, 9000) + b"\0" * 64)]}), 413),
    ("one image over max_pixels: 80x80 header (6,400 px > 4,096, under the request budget)", lambda: _json_req(
        {"images": [_png_b64_bytes(_ihdr_png(80, 80) + b"\0" * 64)]}), 413),
    ("request pixel budget: 3 x 64x64 images (12,288 px > 10,000)", lambda: _json_req(
        {"images": [_png_b64_bytes(_ihdr_png(64, 64) + b"\0" * 64)] * 3}), 413),
    ("more images than max_images", lambda: _json_req({"images": [_small_png()] * 5}), 400),
    ("truncated PNG (valid header, no data)", lambda: _json_req({"images": [_png_b64_bytes(_ihdr_png(8, 8))]}), 400),
    ("not a PNG (GIF)", lambda: _json_req({"images": [_png_b64_bytes(b"GIF89a" + b"\0" * 40)]}), 400),
    ("100,000 nested [", lambda: _json_req(b"[" * 100_000), 400),
    ("100,000 nested {\"a\":", lambda: _json_req(b'{"a":' * 100_000), 400),
    ("integer of 100,000 digits", lambda: _json_req(b'{"images": ' + b"9" * 100_000 + b"}"), 400),
    ("invalid UTF-8", lambda: _json_req(b'{"images": ["\xff\xfe"]}'), 400),
    ("JSON that is a string", lambda: _json_req(b'"images"'), 400),
    ("wrong content-type", lambda: _json_req({"images": [_small_png()]}, content_type="text/plain"), 415),
    ("no content-type", lambda: _post_raw({"Authorization": "Bearer tok", "Content-Length": "2"}, b"{}"), 415),
    ("huge Content-Length, no body", lambda: _post_raw({"Authorization": "Bearer tok", "Content-Type":
                                                        "application/json", "Content-Length": str(10**12)}), 413),
    ("Content-Length under the cap, body never sent", lambda: _post_raw(
        {"Authorization": "Bearer tok", "Content-Type": "application/json", "Content-Length": "1000"}), 408),
    ("negative Content-Length", lambda: _post_raw({"Authorization": "Bearer tok", "Content-Type": "application/json",
                                                   "Content-Length": "-5"}), 400),
    ("no Content-Length", lambda: _post_raw({"Authorization": "Bearer tok", "Content-Type": "application/json"}), 411),
    ("chunked", lambda: _post_raw({"Authorization": "Bearer tok", "Content-Type": "application/json",
                                   "Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n"), 411),
    ("wrong token, 50 MB Content-Length, no body", lambda: _post_raw(
        {"Authorization": "Bearer wrong", "Content-Type": "application/json", "Content-Length": str(50 * 10**6)}), 401),
    ("no token", lambda: _json_req({"images": [_small_png()]}, token=None), 401),
    ("path traversal", lambda: _post_raw({"Authorization": "Bearer tok"}, path="/../../etc/passwd", method="GET"), 404),
    ("encoded path traversal", lambda: _post_raw({"Authorization": "Bearer tok"}, path="/score/..%2f..%2fhealth",
                                                 method="GET"), 404),
    ("unknown method", lambda: _post_raw({"Authorization": "Bearer tok"}, method="DELETE"), 405),
    ("made-up method", lambda: _post_raw({"Authorization": "Bearer tok"}, method="BREW"), 405),
    ("header line of 70,000 bytes", lambda: _post_raw({"Authorization": "Bearer tok", "X-Big": "a" * 70_000}), 431),
]


@pytest.fixture(scope="module", params=["htgrpo.serve", "external_scorer"])
def probed_server(request, tmp_path_factory):
    """A token-protected server with small limits: ``htgrpo.serve``'s RewardServer in this process, or the external
    scorer example as a subprocess. Yields its port."""
    limits = dict(max_images=4, max_pixels=4096, max_request_pixels=10_000, max_body_mb=1, timeout_s=1.5)
    if request.param == "htgrpo.serve":
        srv = RewardServer("127.0.0.1", 0, token="tok", max_inflight_mb=4, **limits).start()
        srv.set_reward(ShapesPromptReward(WORLD))
        yield srv.port
        srv.stop()
        return
    tmp = tmp_path_factory.mktemp("ext")
    (tmp / "token").write_text("tok")
    (tmp / "token").chmod(0o600)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in limits.items()]
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "experiments/reward_servers/external_scorer.py"),
                             "--scorer", "brightness", "--port", "0", "--token-file", str(tmp / "token"), *args],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "ready" in line, line
        yield int(line.rsplit(":", 1)[1])
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.mark.parametrize("name, make, expected", PROBES, ids=[p[0] for p in PROBES])
def test_every_bad_input_gets_its_4xx_in_bounded_time_and_the_server_keeps_serving(probed_server, name, make,
                                                                                   expected):
    code, answer, seconds = _raw(probed_server, make())
    assert code == expected, (name, answer[:300])
    assert seconds < 1.5 + 1.0  # at most the 1.5 s request timeout (the 408 case) and slack
    if expected != 408:
        assert seconds < 1.0, (name, seconds)  # refused at once, not after a timeout
    ok, answer, _ = _raw(probed_server, _json_req({"images": [_small_png()]}))
    assert ok == 200, answer


def test_401_comes_before_any_body_byte_is_read():
    """50 MB announced, nothing sent: the answer is 401 at once (the server never waits for the body); with the right
    token the same request waits for its body (here: the 2 s timeout, 408)."""
    srv = RewardServer("127.0.0.1", 0, token="tok", timeout_s=2, max_body_mb=64).start()
    try:
        srv.set_reward(ShapesPromptReward(WORLD))
        head = {"Content-Type": "application/json", "Content-Length": str(50 * 10**6)}
        code, _, seconds = _raw(srv.port, _post_raw({**head, "Authorization": "Bearer wrong"}))
        assert code == 401 and seconds < 0.5
        code, _, seconds = _raw(srv.port, _post_raw({**head, "Authorization": "Bearer tok"}))
        assert code == 408 and 1.9 < seconds < 3.5
    finally:
        srv.stop()


def test_slow_connections_are_closed_after_the_timeout_and_threads_stay_bounded():
    """Slowloris: 12 connections trickling header bytes. With timeout_s=1 each is closed within ~1 s even though it
    keeps sending; with 4 workers + 2 pending, the 7th and later get 503 at once; threads never exceed the pool."""
    import socket
    import threading

    srv = RewardServer("127.0.0.1", 0, timeout_s=1.0, workers=4, max_pending=2).start()
    srv.set_reward(ShapesPromptReward(WORLD))
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"POST /score HTTP/1.1\r\n")
            socks.append(s)
            time.sleep(0.02)
        t0 = time.perf_counter()
        closed_at: dict[int, float] = {}
        refused = 0
        while len(closed_at) < len(socks) and time.perf_counter() - t0 < 6:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    s.settimeout(0.01)
                    data = s.recv(4096)
                    refused += data.startswith(b"HTTP/1.1 503")
                    closed_at[i] = time.perf_counter() - t0  # an answer or EOF: the server is done with it
                except TimeoutError:  # still open: trickle one more byte
                    try:
                        s.sendall(b"X")  # one byte every 0.2 s: a per-recv timeout alone would never fire
                    except OSError:
                        closed_at[i] = time.perf_counter() - t0
                except OSError:
                    closed_at[i] = time.perf_counter() - t0
            assert threading.active_count() <= threads_before + 4
            time.sleep(0.2)
        # the 2 connections that queued behind the 4 slow ones count their time from accept: closed at ~1 s, too
        assert len(closed_at) == 12 and max(closed_at.values()) < 1.9, closed_at
        assert refused == 6
        assert srv.httpd.refused_connections == 6
        assert _get(srv.url)[0] == 200  # and it still serves
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_token_comes_from_the_environment_or_a_file_never_from_the_config(monkeypatch, tmp_path, compose):
    from htgrpo.serve import server_token

    monkeypatch.setenv(TOKEN_ENV, "from-env")
    cfg = compose("serve", [])
    assert "token" not in cfg.serve and server_token(cfg.serve) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    cfg = compose("serve", [f"serve.token_file={tmp_path / 't'}"])
    assert server_token(cfg.serve) == "from-file"
    with pytest.raises(ConfigError, match="serve.token_file: the token file .* is empty"):
        (tmp_path / "empty").write_text("  \n")
        server_token(compose("serve", [f"serve.token_file={tmp_path / 'empty'}"]).serve)
    with pytest.raises(ConfigError, match=r"serve.token: is not accepted.*HTGRPO_REWARD_TOKEN"):
        server_token(compose("serve", ["+serve.token=abc"]).serve)
    with pytest.raises(ConfigError, match=r"^token: is not accepted"):
        RemoteReward("http://127.0.0.1:1", token="abc")
    monkeypatch.delenv(TOKEN_ENV)
    assert server_token(compose("serve", []).serve) is None
    # the client's keys hold no token, so none reaches .hydra/*.yaml or the loggers' hyperparameters
    cfg = compose("fit", ["reward=remote", "reward.url=http://127.0.0.1:1"])
    assert not any("token" in k and k != "token_file" for k in cfg.reward)


def test_a_secret_on_the_command_line_stops_the_run_before_hydra_writes_anything(tmp_path):
    env = dict(os.environ, HTGRPO_ROOT=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "htgrpo.serve", "+serve.token=s3cr3t-value", "serve.port=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Configuration error: serve.token: secrets are not accepted" in proc.stderr
    assert not any("s3cr3t-value" in f.read_text(errors="replace") for f in tmp_path.rglob("*") if f.is_file())


def test_secret_paths_finds_secret_keys_anywhere_but_not_files_or_nulls():
    from omegaconf import OmegaConf

    from htgrpo._hydra import secret_paths

    cfg = OmegaConf.create({"reward": {"token": None, "token_file": "/x", "parts": [{"api_key": "k"}]},
                            "serve": {"Password": "p"}, "hydra": {"overrides": {"task": ["+a.token=zz"]}}})
    assert secret_paths(cfg) == ["reward.parts[0].api_key", "serve.Password"]


def _free_port() -> int:
    srv = RewardServer("127.0.0.1", 0)
    port = srv.port
    srv.httpd.server_close()
    return port


def test_client_stops_at_start_up_on_401_403_404_naming_url_status_and_key(monkeypatch):
    srv = RewardServer("127.0.0.1", 0, token="tok").start()
    srv.set_reward(ShapesPromptReward(WORLD))
    try:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            RemoteReward(srv.url, startup_timeout=600).check_ready()
        assert err.value.key == "token_file" and "HTTP 401" in str(err.value) and srv.url in str(err.value)
        assert "no token was sent" in str(err.value) and TOKEN_ENV in str(err.value)
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        with pytest.raises(ConfigError, match="token sent was refused"):
            RemoteReward(srv.url, startup_timeout=600).check_ready()
        with pytest.raises(ConfigError) as err:
            RemoteReward(srv.url + "/v1", startup_timeout=600).check_ready()
        assert err.value.key == "url" and "HTTP 404" in str(err.value) and f"{srv.url}/v1/health" in str(err.value)
        assert time.perf_counter() - t0 < 3  # failed fast, no waiting through startup_timeout
        monkeypatch.setenv(TOKEN_ENV, "tok")
        client = RemoteReward(srv.url)
        client.check_ready()
        assert client.server_limits["max_images"] == 256
    finally:
        srv.stop()
    with pytest.raises(ConfigError, match=r"no reward server ready at .* within 1 s"):  # nothing listens
        RemoteReward(f"http://127.0.0.1:{_free_port()}", startup_timeout=1, retry_wait=0.1).check_ready()


def test_client_waits_for_a_loading_server_at_start_up():
    import threading

    srv = RewardServer("127.0.0.1", 0).start()
    try:
        threading.Timer(0.6, srv.set_reward, args=(ShapesPromptReward(WORLD),)).start()
        t0 = time.perf_counter()
        RemoteReward(srv.url, startup_timeout=30, retry_wait=0.1, max_retry_wait=0.2).check_ready()
        assert 0.5 < time.perf_counter() - t0 < 5
    finally:
        srv.stop()


def test_client_retries_through_a_server_restart_on_the_same_port():
    """The server goes away and a new one comes up on the same port 1.5 s later: a request sent in between is
    retried (backoff) and scored, no NaN. The client splits the batch to the server's announced max_images."""
    import threading

    reward = ShapesPromptReward(WORLD)
    srv = RewardServer("127.0.0.1", 0, max_images=3).start()
    srv.set_reward(reward)
    port = srv.port
    client = RemoteReward(srv.url, retry_seconds=20, retry_wait=0.1, max_retry_wait=0.4)
    client.check_ready()
    images = torch.zeros(5, 3, 128, 128, dtype=torch.uint8)
    records = [ShapesPromptStream(WORLD, seed=0)[i].prompt.record for i in range(5)]
    srv.stop()
    box: dict[str, RewardServer] = {}

    def restart() -> None:
        box["srv"] = RewardServer("127.0.0.1", port, max_images=3).start()
        box["srv"].set_reward(reward)

    timer = threading.Timer(1.5, restart)
    timer.start()
    try:
        t0 = time.perf_counter()
        out = client.score(images, records)
        assert out.num_failed == 0 and torch.equal(out.scores, reward(images, records))
        assert time.perf_counter() - t0 > 1.4
        assert box["srv"].requests_served == 2  # 5 images in requests of <= 3
    finally:
        timer.join()
        box["srv"].stop()


# ---- fits against a server that restarts / stays down ---------------------------------------------------------
class ServerOutage(L.Callback):
    """After ``after_steps`` rollout steps, stops the in-process reward server ``box["srv"]``; when ``down_s`` is not
    None a new server on the same port comes up ``down_s`` seconds later (a restart). Records the policy's weights
    after each rollout step."""

    def __init__(self, box: dict, after_steps: int = 1, down_s: float | None = None):
        self.box, self.after_steps, self.down_s, self.seen = box, after_steps, down_s, 0
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import threading

        self.seen += 1
        self.weights.append({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})
        if self.seen != self.after_steps:
            return
        old = self.box["srv"]
        old.stop()
        if self.down_s is not None:
            def restart() -> None:
                self.box["srv"] = RewardServer("127.0.0.1", old.port).start()
                self.box["srv"].set_reward(old.reward)

            self.box["timer"] = threading.Timer(self.down_s, restart)
            self.box["timer"].start()


_TINY_FIT = [
    "experiment=shapes_ht", "policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
    "data.batch_size=2", "algorithm.num_generations=4", "sampler.num_steps=4", "benchmark.prompts.per_task=1",
    "benchmark.images_per_prompt=1", "callbacks.progress_bar=null", "algorithm.stages.n_global=1",
    "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1", "validate_at_start=false",
    "validate_at_end=false", "logger=csv", "trainer.limit_train_batches=3", "reward=remote", "reward.timeout=5",
    "reward.retry_wait=0.05", "reward.max_retry_wait=0.2"]


def _csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as fh:
        return [r for r in csv.DictReader(fh) if r.get("train/nonfinite_rewards")]


def test_fit_finishes_with_no_nan_reward_when_the_server_restarts_within_retry_seconds(compose, tmp_path):
    from htgrpo.fit import run

    box = {"srv": RewardServer("127.0.0.1", 0).start()}
    outage = ServerOutage(box, after_steps=1, down_s=1.0)
    try:
        cfg = _without_hydra(compose("fit", _TINY_FIT + [f"reward.url={box['srv'].url}", "reward.retry_seconds=30",
                                                         f"paths.output_dir={tmp_path / 'run'}"]))
        box["srv"].set_reward(_fit_world_reward(cfg))
        summary = _run_with_extra_callback(run, cfg, outage)
    finally:
        box.get("timer") and box["timer"].join()
        box["srv"].stop()
    rows = _csv_rows(tmp_path / "run")
    assert summary["steps"] == 3
    assert [float(r["train/nonfinite_rewards"]) for r in rows] == [0.0, 0.0, 0.0]
    assert [float(r["train/update_skipped"]) for r in rows] == [0.0, 0.0, 0.0]
    assert box["srv"].requests_served == 2  # steps 2 and 3 were scored by the restarted server


def test_fit_stops_with_an_error_and_a_checkpoint_when_the_server_stays_down(compose, tmp_path):
    """Server gone after step 1, retry_seconds 0.3, max_failed_batches 2: steps 2 and 3 get no reward, are not
    trained on (weights unchanged since step 1), and the run stops with RewardUnavailableError and a checkpoint."""
    from htgrpo.fit import run

    box = {"srv": RewardServer("127.0.0.1", 0).start()}
    outage = ServerOutage(box, after_steps=1)
    cfg = _without_hydra(compose("fit", _TINY_FIT + [
        f"reward.url={box['srv'].url}", "reward.retry_seconds=0.3", "reward.max_failed_batches=2",
        "trainer.limit_train_batches=6", f"paths.output_dir={tmp_path / 'run'}"]))
    box["srv"].set_reward(_fit_world_reward(cfg))
    with pytest.raises(RewardUnavailableError) as err:
        _run_with_extra_callback(run, cfg, outage)
    message = str(err.value)
    assert "no finite reward in 2 consecutive rollout batches (reward.max_failed_batches=2)" in message
    assert "ConnectionRefusedError" in message and "reward_unavailable.ckpt" in message
    ckpt = tmp_path / "run" / "checkpoints" / "reward_unavailable.ckpt"
    assert ckpt.exists()
    assert outage.seen == 3  # stopped after the 2nd unscored batch, not at limit_train_batches=6
    for later in outage.weights[1:]:  # nothing trained on the unscored batches
        assert all(torch.equal(later[k], outage.weights[0][k]) for k in later)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[f"policy.{k}"], v) for k, v in outage.weights[0].items())
    rows = _csv_rows(tmp_path / "run")
    assert [float(r["train/nonfinite_rewards"]) for r in rows] == [0.0, 8.0, 8.0]
    assert [float(r["train/update_skipped"]) for r in rows] == [0.0, 1.0, 1.0]


def _fit_world_reward(cfg) -> ShapesPromptReward:
    """The ShapesWorld reward of the fit's own world (conf/world/shapes.yaml: 110 px images), as the server's."""
    from htgrpo.config import instantiate_node

    return ShapesPromptReward(instantiate_node(cfg, "world"))


def _run_with_extra_callback(run, cfg, callback):
    """``htgrpo.fit.run`` with one more (unconfigured) callback appended to the configured ones."""
    import htgrpo.fit as fit

    original = fit.build_callbacks
    fit.build_callbacks = lambda c: original(c) + [callback]
    try:
        return run(cfg)
    finally:
        fit.build_callbacks = original


def test_a_mix_checks_its_served_parts_at_start_up_and_takes_their_failure_limit(monkeypatch):
    import pickle

    from htgrpo.rewards.mix import MixReward

    srv = RewardServer("127.0.0.1", 0, token="tok").start()
    srv.set_reward(ShapesPromptReward(WORLD))
    try:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        mix = MixReward({"local": {"weight": 1.0, "reward": ShapesPromptReward(WORLD)},
                         "served": {"weight": 0.5, "reward": RemoteReward(srv.url, max_failed_batches=4)}})
        assert mix.max_failed_batches == 4
        with pytest.raises(ConfigError) as err:
            mix.check_ready()
        assert err.value.key == "components.served.reward.token_file" and "HTTP 401" in str(err.value)
        copy = pickle.loads(pickle.dumps(mix.parts["served"]))  # ddp_spawn pickles the module with its reward
        assert copy.url == srv.url and copy.max_failed_batches == 4
    finally:
        srv.stop()


def test_fit_checks_a_served_reward_before_building_the_policy(compose, monkeypatch):
    from htgrpo.fit import check_reward_before_build

    srv = RewardServer("127.0.0.1", 0, token="tok").start()
    srv.set_reward(ShapesPromptReward(WORLD))
    try:
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        cfg = compose("fit", ["experiment=shapes_ht", "reward=remote", f"reward.url={srv.url}"])
        with pytest.raises(ConfigError, match=r"^reward.token_file: .*HTTP 401"):
            check_reward_before_build(cfg)
        monkeypatch.setenv(TOKEN_ENV, "tok")
        assert check_reward_before_build(cfg) is True
        assert check_reward_before_build(compose("fit", ["experiment=shapes_ht"])) is False  # built, then checked
    finally:
        srv.stop()
