"""reward=vlm_judge against a fake OpenAI-compatible server on 127.0.0.1 (experiments/reward_servers/fake_openai.py):
parse rules, the request format, retries, concurrency, start-up checks and the recipes in conf/reward/."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, load_script
from htgrpo.config import ConfigError
from htgrpo.rewards.base import safe_score
from htgrpo.rewards.registry import build_reward
from htgrpo.rewards.vlm_judge import (
    JudgeReply,
    VLMJudgeReward,
    first_number,
    json_value,
    scale_to_unit,
    yes_probability,
)

fake = load_script("fake_openai", REPO_ROOT / "experiments" / "reward_servers" / "fake_openai.py")


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def fixed(content: str, yes_prob: float | None = None):
    return lambda body: (200, fake.chat_response(content, yes_prob))


def judge(server, **kwargs) -> VLMJudgeReward:
    settings = dict(base_url=server.url, model="fake-judge", prompt_template="Rate 0-10: {prompt}", retry_wait=0.01,
                    timeout=5.0)
    settings.update(kwargs)
    reward = VLMJudgeReward(**settings)
    reward.check_ready()  # what htgrpo.fit calls at start-up
    return reward


# ---- parse rules ------------------------------------------------------------------------------------------------
def test_parse_rules():
    assert first_number("Score: 7") == 7.0
    assert first_number("I'd say 7.5/10") == 7.5
    assert first_number("no digits here") is None
    assert first_number("elements: 1, 0, 1. Final Score: 4", r"Final Score:\s*([0-9.]+)") == 4.0
    assert first_number("Score 3", r"Final Score:\s*([0-9.]+)") is None
    assert scale_to_unit(7.0, 0.0, 10.0) == pytest.approx(0.7)
    assert scale_to_unit(1.0, 1.0, 10.0) == 0.0 and scale_to_unit(10.0, 1.0, 10.0) == 1.0
    assert scale_to_unit(11.0, 0.0, 10.0) is None and scale_to_unit(math.nan, 0.0, 10.0) is None
    # P(yes) normalised over yes + no spellings; other candidates ignored
    top = [(" Yes", math.log(0.6)), ("yes", math.log(0.1)), ("No", math.log(0.2)), ("Maybe", math.log(0.1))]
    assert yes_probability(top, ["yes"], ["no"]) == pytest.approx(0.7 / 0.9)
    assert yes_probability([("Maybe", 0.0)], ["yes"], ["no"]) is None
    assert json_value('Sure!\n```json\n{"score": 4, "why": "ok"}\n```', "score") == 4.0
    assert json_value('{"a": 1} then {"result": {"score": "8/10"}}', "result.score") == 8.0
    assert json_value('{"score": true}', "score") is None and json_value("{broken", "score") is None


def test_reply_reading_takes_content_and_first_token_candidates():
    body = fake.chat_response("Yes", yes_prob=0.8)
    reply = JudgeReply.from_response(body)
    assert reply.text == "Yes" and dict(reply.top_logprobs)["Yes"] == pytest.approx(math.log(0.8))
    assert JudgeReply.from_response({"choices": [{"message": {"content": "Score: 7"}}]}).top_logprobs is None
    with pytest.raises(ValueError):
        JudgeReply.from_response({"error": "x"})


# ---- against the fake server --------------------------------------------------------------------------------------
def test_number_parse_and_request_format(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "s3cret")
    batch = images(3)
    with fake.FakeOpenAIServer(fixed("Score: 7"), api_key="s3cret") as server:
        reward = judge(server, api_key_env="FAKE_JUDGE_KEY", max_tokens=12, temperature=0.5)
        out = reward.score(batch, ["a red circle", "two squares", "a blue star"])
    assert torch.allclose(out.scores, torch.full((3,), 0.7))
    assert out.num_failed == 0 and torch.equal(out.components["vlm_judge/raw"], torch.full((3,), 7.0))
    assert len(server.requests) == 3
    prompts_seen = set()
    for headers, body in server.requests:
        assert headers["Authorization"] == "Bearer s3cret"
        assert body["model"] == "fake-judge" and body["max_tokens"] == 12 and body["temperature"] == 0.5
        assert "logprobs" not in body
        (message,) = body["messages"]
        image_part, text_part = message["content"]
        assert message["role"] == "user" and image_part["type"] == "image_url" and text_part["type"] == "text"
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sent = np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        # the PNG is lossless: the server sees exactly one of the images, and the text holds its prompt
        index = [torch.equal(torch.from_numpy(sent).permute(2, 0, 1), im) for im in batch].index(True)
        assert text_part["text"] == "Rate 0-10: " + ["a red circle", "two squares", "a blue star"][index]
        prompts_seen.add(index)
    assert prompts_seen == {0, 1, 2}
    clone = pickle.loads(pickle.dumps(reward))  # ddp_spawn pickles the module with its reward (thread pool and all)
    assert clone.model == "fake-judge" and clone.api_key == "s3cret"


def test_yes_no_logprob_reads_top_logprobs_and_asks_for_them():
    with fake.FakeOpenAIServer(fixed("Yes", yes_prob=0.8)) as server:
        reward = judge(server, parse="yes_no_logprob", top_logprobs=7, yes_tokens=["yes"], no_tokens=["no"])
        out = reward.score(images(2), ["a", "b"])
    assert torch.allclose(out.scores, torch.full((2,), 0.8), atol=1e-6)
    body = server.requests[0][1]
    assert body["logprobs"] is True and body["top_logprobs"] == 7


def test_yes_no_without_logprobs_falls_back_to_the_text():
    with fake.FakeOpenAIServer(fixed("No, it does not.")) as server:
        out = judge(server, parse="yes_no_logprob").score(images(1), ["a"])
    assert out.scores.tolist() == [0.0]


def test_json_parse_with_range():
    with fake.FakeOpenAIServer(fixed('Here you go: ```json\n{"score": 4}\n```')) as server:
        out = judge(server, parse="json", json_key="score", score_range=[0, 5]).score(images(2), ["a", "b"])
    assert torch.allclose(out.scores, torch.full((2,), 0.8))


def test_unparseable_reply_is_nan_counted_and_warned(caplog):
    replies = iter(["Score: 7", "I cannot rate this image.", "Score: 70"])
    lock = threading.Lock()

    def reply(body):
        with lock:
            return 200, fake.chat_response(next(replies))

    with fake.FakeOpenAIServer(reply) as server:
        reward = judge(server, concurrency=1)
        with caplog.at_level(logging.WARNING, logger="htgrpo.rewards.vlm_judge"):
            out = safe_score(reward, images(3), ["a", "b", "c"])
    assert out.scores[0] == pytest.approx(0.7)
    assert math.isnan(out.scores[1]) and math.isnan(out.scores[2])  # no number / 70 is off the 0..10 scale
    assert out.num_failed == 2 and reward.num_unparseable == 2
    assert out.components["vlm_judge/unparseable"].tolist() == [0.0, 1.0, 1.0]
    assert sum("unparseable reply" in r.getMessage() for r in caplog.records) == 2


def test_retries_on_500_and_timeouts_then_gives_nan():
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(body):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 1:
            return 500, {"error": "overloaded"}
        if n == 2:
            time.sleep(0.6)  # longer than the client's timeout
        return 200, fake.chat_response("Score: 5")

    with fake.FakeOpenAIServer(flaky) as server:
        out = judge(server, timeout=0.3, retries=2).score(images(1), ["a"])
    assert out.scores.tolist() == [0.5] and calls["n"] == 3  # 500, timeout, success

    with fake.FakeOpenAIServer(lambda body: (503, {"error": "down"})) as server:
        reward = judge(server, retries=2)
        out = reward.score(images(1), ["a"])
    assert math.isnan(out.scores[0]) and len(server.requests) == 3 and reward.num_failed_requests == 1

    with fake.FakeOpenAIServer(lambda body: (400, {"error": "bad request"})) as server:
        out = judge(server, retries=2).score(images(1), ["a"])
    assert math.isnan(out.scores[0]) and len(server.requests) == 1  # a 400 is not retried


def test_concurrency_is_bounded_and_used():
    with fake.FakeOpenAIServer(fixed("Score: 7"), latency=0.15) as server:
        reward = judge(server, concurrency=4)
        t0 = time.perf_counter()
        out = reward.score(images(8), ["p"] * 8)
        elapsed = time.perf_counter() - t0
    assert torch.isfinite(out.scores).all()
    assert server.max_in_flight == 4  # never more than `concurrency`, and all of them used
    assert elapsed < 8 * 0.15 * 0.75  # two waves, not eight requests one after another


def test_start_up_checks_name_the_key(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "wrong")
    with fake.FakeOpenAIServer(fixed("Score: 7"), api_key="right") as server:
        with pytest.raises(ConfigError) as err:
            judge(server, api_key_env="FAKE_JUDGE_KEY")
        assert err.value.key == "api_key_env" and "401" in err.value.message
    with fake.FakeOpenAIServer(fixed("Score: 7"), model="served-model") as server:
        with pytest.raises(ConfigError) as err:
            judge(server, model="other-model")
        assert err.value.key == "model" and "served-model" in err.value.message
        with pytest.raises(ConfigError) as err:
            judge(server, base_url=server.url[:-3], model="served-model")  # forgot the /v1
        assert err.value.key == "base_url" and "404" in err.value.message
        port = server.port
    with pytest.raises(ConfigError) as err:  # nothing listens there any more
        judge(type("S", (), {"url": f"http://127.0.0.1:{port}/v1"})(), retries=0)
    assert err.value.key == "base_url" and "cannot reach" in err.value.message
    with pytest.raises(ConfigError) as err:
        VLMJudgeReward("http://127.0.0.1:1/v1", "m", "{prompt}", api_key_env="sk-live-123", check_at_start=False)
    assert err.value.key == "api_key_env" and "NAME of an environment variable" in err.value.message
    monkeypatch.delenv("FAKE_JUDGE_KEY")
    with pytest.raises(ConfigError, match="FAKE_JUDGE_KEY is not set"):
        VLMJudgeReward("http://127.0.0.1:1/v1", "m", "{prompt}", api_key_env="FAKE_JUDGE_KEY", check_at_start=False)
    with pytest.raises(ConfigError, match="parse"):
        VLMJudgeReward("http://127.0.0.1:1/v1", "m", "{prompt}", parse="regex", check_at_start=False)


def test_unifiedreward_recipe_scores_final_score_over_5():
    reply = "elements: circle (object): 1\nFinal Score: 4"
    with fake.FakeOpenAIServer(fixed(reply), model="UnifiedReward-7b-v1.5") as server:
        reward = build_reward("unifiedreward", options={"base_url": server.url, "retry_wait": 0.01})
        out = reward.score(images(2, size=32), ["a red circle", "a dog"])
    assert torch.allclose(out.scores, torch.full((2,), 0.8))
    body = server.requests[0][1]
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (512, 512)
    assert "Final Score:" in body["messages"][0]["content"][1]["text"] and body["temperature"] == 0.0


@pytest.mark.parametrize("name,reply,expected", [("qwen_vl_quality", "7", 6 / 9), ("vlm_yes_no", None, 0.25)])
def test_other_recipes(name, reply, expected):
    answer = fixed("No", yes_prob=0.25) if reply is None else fixed(reply)
    with fake.FakeOpenAIServer(answer, model="Qwen/Qwen2.5-VL-7B-Instruct") as server:
        out = build_reward(name, options={"base_url": server.url}).score(images(1), ["a cat"])
    assert out.scores[0].item() == pytest.approx(expected, abs=1e-6)
    assert json.dumps(server.requests[0][1])  # a JSON-serialisable request


def test_training_against_the_judge_overlaps_and_stops_when_it_is_down(tmp_path):
    """HT-GRPO on the tiny ShapesWorld policy with reward=vlm_judge: scoring overlaps sampling by default (auto), a
    judge that answers get trained on, a judge that only fails stops the run after max_failed_batches batches."""
    from test_overlap_scoring import fit_steps, make_module

    with fake.FakeOpenAIServer(lambda body: (200, fake.chat_response(f"Score: {len(server.requests) % 11}"))) as server:
        reward = judge(server, concurrency=2)
        module = make_module(reward)  # overlap_scoring=auto, rollout chunks of 2 images
        assert module.chunk_scorer() is not None
        fit_steps(module, 1, tmp_path / "up")
    assert len(server.requests) == 8 and torch.isfinite(module.last_scored.rewards).all()
    assert module.last_update_stats and module.reward_failure is None

    with fake.FakeOpenAIServer(lambda body: (503, {"error": "loading"})) as server:
        reward = judge(server, retries=0, max_failed_batches=2)
        module = make_module(reward)
        fit_steps(module, 4, tmp_path / "down")
    assert module.rollout_step == 2 and module.consecutive_unscored_batches == 2  # stopped after 2 of 4 batches
    assert "max_failed_batches=2" in module.reward_failure and "HTTP 503" in module.reward_failure
