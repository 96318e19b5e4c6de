"""The reward server and its client on 127.0.0.1: protocol, bad input, load test, and a server killed mid-run."""

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
from htgrpo.rewards.remote import RemoteReward, build_request
from htgrpo.rewards.shapes import ShapesPromptReward
from htgrpo.serve import RewardServer

WORLD = ShapesWorldConfig()


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
    assert _get(server.url) == (200, {"status": "ok", "reward": "shapes"})
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


def _png_b64(array) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "Expecting"),
    (b"[1, 2]", "JSON object"),
    (b'{"images": []}', "non-empty list"),
    (b'{"images": ["@@@"]}', "images[0]: not a base64 PNG"),
    (b'{"images": ["aGVsbG8="]}', "images[0]: not a base64 PNG"),
    (b'{"images": ["x"], "records": [], "extra": 1}', "unknown keys ['extra']"),
    (b'{"images": ["x"], "records": []}', "one entry per image"),
    ("jpeg", "expected a PNG file"),
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
        elif body == "toomany":
            body = json.dumps({"images": [_png_b64(small)] * 5}).encode()
        code, answer = _post(srv.url, body)
        assert code == 400 and reason in answer["error"], answer
        # still serving
        assert _get(srv.url)[0] == 200
        good = build_request(torch.zeros(1, 3, 128, 128, dtype=torch.uint8), [ShapesPromptStream(WORLD, seed=0)[0].prompt.record])
        assert _post(srv.url, json.dumps(good).encode())[0] == 200


def test_bearer_token_is_enforced():
    srv = RewardServer("127.0.0.1", 0, token="s3cret").start()
    try:
        srv.set_reward(ShapesPromptReward(WORLD))
        assert _get(srv.url)[0] == 401
        assert _get(srv.url, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _get(srv.url, headers={"Authorization": "Bearer s3cret"})[0] == 200
        images = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
        records = [ShapesPromptStream(WORLD, seed=0)[i].prompt.record for i in range(2)]
        assert RemoteReward(srv.url, retries=0).score(images, records).num_failed == 2  # no token: refused
        out = RemoteReward(srv.url, token="s3cret").score(images, records)
        assert out.num_failed == 0 and torch.equal(out.scores, ShapesPromptReward(WORLD)(images, records))
    finally:
        srv.stop()


def test_client_gives_nan_when_nothing_listens():
    srv = RewardServer("127.0.0.1", 0)
    url = srv.url
    srv.httpd.server_close()  # the port is free again: connection refused
    t0 = time.perf_counter()
    out = RemoteReward(url, timeout=2, retries=1, retry_wait=0.05).score(torch.zeros(3, 3, 8, 8, dtype=torch.uint8),
                                                                         [None] * 3)
    assert out.num_failed == 3 and torch.isnan(out.scores).all()
    assert time.perf_counter() - t0 < 5


# ---- a real server process, killed in the middle of a fit ----------------------------------------------------
class KillServerAfter(L.Callback):
    """Kills process ``pid`` (SIGKILL) after ``steps`` training batches (rollout steps)."""

    def __init__(self, pid: int, steps: int = 1):
        self.pid, self.steps, self.seen = int(pid), int(steps), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.steps:
            os.kill(self.pid, signal.SIGKILL)


def _start_server_process(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HTGRPO_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "htgrpo.serve", "reward=shapes", "serve.port=0"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # bounded: the process prints "ready ... http://127.0.0.1:PORT" or dies
        if "ready" in line and "http://127.0.0.1:" in line:
            return proc, line.split("ready in")[1].split(": ", 1)[1].split()[0]
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError("reward server did not start")


def test_fit_with_remote_reward_survives_the_server_being_killed(compose, tmp_path):
    from htgrpo.fit import run

    proc, url = _start_server_process(tmp_path)
    try:
        assert RemoteReward(url).health() == {"status": "ok", "reward": "shapes"}
        cfg = compose("fit", [
            "experiment=shapes_ht", "policy=shapes_llada", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
            "data.batch_size=2", "algorithm.num_generations=4", "sampler.num_steps=4", "benchmark.prompts.per_task=1",
            "benchmark.images_per_prompt=1", "callbacks.progress_bar=null", "algorithm.stages.n_global=1",
            "algorithm.stages.n_struct=1", "algorithm.stages.n_refine=1", "validate_at_start=false",
            "validate_at_end=false", "logger=csv", "trainer.limit_train_batches=3",
            "reward=remote", f"reward.url={url}", "reward.timeout=5", "reward.retries=1", "reward.retry_wait=0.05",
            f"+callbacks.kill_server._target_={__name__}.KillServerAfter", f"+callbacks.kill_server.pid={proc.pid}",
            f"paths.output_dir={tmp_path / 'run'}"])
        summary = run(_without_hydra(cfg))
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert summary["steps"] == 3  # the run finished
    with open(tmp_path / "run" / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/nonfinite_rewards")]
    # step 1 scored by the server; then it is killed: all 8 rewards of steps 2 and 3 are NaN, counted
    assert [float(r["train/nonfinite_rewards"]) for r in rows] == [0.0, 8.0, 8.0]
    assert math.isfinite(float(rows[0]["train/reward/mean"]))
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)


def test_an_external_scorer_speaking_the_protocol_works_with_the_client(tmp_path):
    """The worked example for scorers that live in their own environment (ImageReward, HPSv3 ...)."""
    script = REPO_ROOT / "experiments" / "reward_servers" / "external_scorer.py"
    proc = subprocess.Popen([sys.executable, str(script), "--scorer", "brightness", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # "scorer brightness ready: http://127.0.0.1:PORT"
        assert "ready" in line, line
        url = line.split("ready: ")[1].strip()
        client = RemoteReward(url, retries=0)
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
