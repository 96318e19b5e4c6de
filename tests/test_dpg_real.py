"""DPG-Bench with VQA backends: the official aggregation on a small CSV in the official schema (dependency chains
listed out of order, both category modes, the skipped first row), tiny random BLIP VQA through the user path, and
``python -m htgrpo.evaluate benchmark=dpg`` end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from htgrpo.data.prompt_sets import DPGPrompts
from htgrpo.data.records import DPG_CSV_COLUMNS, BenchmarkPrompt, DPGItem, DPGProposition
from htgrpo.evaluation.benchmark import Benchmark, run_benchmark
from htgrpo.rewards.dpg import apply_dependencies, apply_dependencies_soft, score_dpg_answers
from htgrpo.rewards.dpg_real import DPGReward, DPGVQAScorer, grid_crops, make_grid_2x2, soft_prompt_score
from htgrpo.rewards.vqa import BlipVQA, VQABackend, YesNoLogitVQA, yes_no_probability
from tiny_scorers import save_tiny_blip_vqa, save_tiny_llava

# The CSV, in file order. Item "A" lists question 3 BEFORE its parent 2 (and 2 depends on 1);
# item "B" is a plain chain. Row 0 (A's question 1) is the row the official script skips.
ROWS = [
    ("A", 1, "0", "entity", "whole", "entity - whole (dog)", "is there a dog?"),
    ("A", 3, "2", "attribute", "color", "attribute - color (dog, brown)", "is the dog brown?"),
    ("A", 2, "1", "entity", "part", "entity - part (dog, tail)", "does the dog have a tail?"),
    ("A", 4, "0", "global", "", "global - (park)", "is this a park?"),
    ("B", 1, "0", "entity", "whole", "entity - whole (cat)", "is there a cat?"),
    ("B", 2, "1", "other", "count", "other - count (cat, ==2)", "are there two cats?"),
]
PROMPTS = {"A": "a brown dog with a tail in a park", "B": "two cats"}
# Answers per item and crop (2 crops each), by proposition id.
ANSWERS = {
    "A": [{1: False, 2: True, 3: True, 4: True}, {1: True, 2: False, 3: True, 4: False}],
    "B": [{1: True, 2: True}, {1: False, 2: True}],
}


def write_benchmark(folder: Path) -> tuple[Path, Path]:
    prompts = folder / "prompts"
    prompts.mkdir(parents=True)
    for item_id, text in PROMPTS.items():
        (prompts / f"{item_id}.txt").write_text(text + "\n")
    csv_path = folder / "dpg_bench.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(DPG_CSV_COLUMNS)
        for item_id, pid, dep, broad, detailed, tup, q in ROWS:
            w.writerow([item_id, PROMPTS[item_id], "", pid, dep, broad, detailed, tup, q])
    return prompts, csv_path


class ScriptedVQA(VQABackend):
    """Answers from ``ANSWERS``: the image's top-left red value encodes (item index, crop index)."""

    name = "scripted"

    def __init__(self, questions: dict[str, dict[str, int]]):
        super().__init__("scripted", device="cpu")
        self.questions = questions  # item -> question -> proposition id

    def _load(self) -> None:
        self.model = torch.nn.Identity()

    def _answer_batch(self, images, questions):
        out = []
        for im, q in zip(images, questions):
            code = im.getpixel((0, 0))[0]
            item, crop = "AB"[code // 10], code % 10
            out.append("yes" if ANSWERS[item][crop][self.questions[item][q]] else "no")
        return out


class CodedImages:
    """A generator whose image for crop j of prompt i is filled with the value 10*i + j."""

    def generate(self, prompts: list[BenchmarkPrompt], generator: torch.Generator) -> torch.Tensor:
        seen: dict[str, int] = {}
        images = []
        for p in prompts:
            j = seen.get(p.key, 0)
            seen[p.key] = j + 1
            images.append(torch.full((3, 8, 8), 10 * "AB".index(p.key) + j, dtype=torch.uint8))
        return torch.stack(images)


def scripted_benchmark(tmp_path: Path, category_mode: str, skip_first_row: bool) -> Benchmark:
    prompts, csv_path = write_benchmark(tmp_path)
    questions: dict[str, dict[str, int]] = {i: {} for i in PROMPTS}
    for item_id, pid, *_, q in ROWS:
        questions[item_id][q] = pid
    scorer = DPGVQAScorer(ScriptedVQA(questions), category_mode=category_mode, skip_first_row=skip_first_row)
    return Benchmark(DPGPrompts(str(prompts), str(csv_path)), scorer, images_per_prompt=2, batch_size=4)


# ---- the rules, hand-computed ----------------------------------------------------------------------------------
def test_dependency_rule_walks_csv_row_order_in_place(tmp_path):
    from htgrpo.data.loaders import load_dpg

    prompts, csv_path = write_benchmark(tmp_path)
    a = load_dpg(prompts, csv_path)[0]
    assert [p.row for p in a.propositions] == [0, 2, 1, 3]  # sorted by id, rows remembered
    order = sorted(a.propositions, key=lambda p: p.row)
    # crop 1: q1 no. Row order: q3 reads parent q2's RAW yes (q2 is zeroed only on the next row) -> q3 stays 1.
    assert apply_dependencies("A", order, {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}) == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}
    # in id order the zero would propagate down the chain (what the script does when parents come first)
    by_id = sorted(a.propositions, key=lambda p: p.proposition_id)
    assert apply_dependencies("A", by_id, {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}


def test_soft_dependency_rule_reduces_to_the_hard_one_on_0_1():
    item = DPGItem("x", "x", (DPGProposition(1, (0,), "entity", "whole", "entity - whole (a)", "a?"),
                              DPGProposition(2, (1,), "attribute", "color", "attribute - color (a, red)", "red?")))
    for p1 in (0.0, 1.0):
        for p2 in (0.0, 1.0):
            hard = apply_dependencies("x", item.propositions, {1: p1, 2: p2})
            assert apply_dependencies_soft("x", item.propositions, {1: p1, 2: p2}) == hard
    assert apply_dependencies_soft("x", item.propositions, {1: 0.5, 2: 0.8}) == {1: 0.5, 2: pytest.approx(0.4)}
    assert soft_prompt_score(item, {1: 0.5, 2: 0.8}) == pytest.approx((0.5 + 0.4) / 2)


def test_yes_no_probability_is_the_softmax_over_yes_and_no_tokens():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.0, -1.0]])
    # yes = token 0, no = token 1 (token 2 is ignored): e^2 / (e^2 + 1) = 0.8808; 1/2
    assert yes_no_probability(logits, [0], [1]).tolist() == pytest.approx([0.880797, 0.5], abs=1e-6)
    # two yes tokens: (e^0 + e^-1) / (e^0 + e^-1 + e^0) for row 2
    assert float(yes_no_probability(logits, [0, 2], [1])[1]) == pytest.approx((1 + math.exp(-1)) / (2 + math.exp(-1)))


# ---- aggregation through the benchmark, both category modes, the skipped row -------------------------------------
# Crop scores (row-order rule): A: {0,0,1,1} -> 0.5 and {1,0,0,0} -> 0.25; B: 1.0 and 0.0.
# overall = mean(0.375, 0.5) x 100 = 43.75.
def test_official_category_mode_uses_the_last_crop_before_zeroing(tmp_path):
    report = run_benchmark(scripted_benchmark(tmp_path, "official", False), CodedImages(), progress=False)
    assert report.scores["overall"] == pytest.approx(43.75)
    # last crops, raw: A q1=1 q2=0 q3=1 q4=0; B q1=0 q2=1
    assert report.scores["entity"] == pytest.approx(100 / 3)  # A q1, A q2, B q1
    assert report.scores["attribute"] == pytest.approx(100.0)
    assert report.scores["global"] == pytest.approx(0.0)
    assert report.scores["other"] == pytest.approx(100.0)
    assert [r["score"] for r in report.rows] == [0.5, 0.25, 1.0, 0.0]
    assert report.rows[0]["answers"] == {"1": 0.0, "2": 1.0, "3": 1.0, "4": 1.0}  # raw answers of A's crop 1


def test_fixed_category_mode_uses_gated_scores_of_every_crop(tmp_path):
    report = run_benchmark(scripted_benchmark(tmp_path, "fixed", False), CodedImages(), progress=False)
    assert report.scores["overall"] == pytest.approx(43.75)
    # gated: A q3 (1, 0); A q4 (1, 0); B q2 (1, 0); entity: A q1 (0, 1), A q2 (0, 0), B q1 (1, 0)
    assert report.scores["attribute"] == pytest.approx(50.0)
    assert report.scores["global"] == pytest.approx(50.0)
    assert report.scores["other"] == pytest.approx(50.0)
    assert report.scores["entity"] == pytest.approx(100 * 2 / 6)


def test_skip_first_row_drops_row_0_and_the_prompt_that_depends_on_it(tmp_path):
    # Row 0 is A's question 1; A's question 2 depends on it -> the script's KeyError skips prompt A entirely.
    report = run_benchmark(scripted_benchmark(tmp_path, "official", True), CodedImages(), progress=False)
    assert report.scores["overall"] == pytest.approx(50.0)  # B alone
    assert report.scores == {"entity": 0.0, "other": 100.0, "overall": 50.0}
    assert [r["skipped"] != "" for r in report.rows] == [True, True, False, False]
    # without a dependent question, the prompt is scored on its remaining questions
    item = DPGItem("C", "c", (DPGProposition(1, (0,), "entity", "whole", "entity - whole (a)", "a?", row=0),
                              DPGProposition(2, (0,), "entity", "whole", "entity - whole (b)", "b?", row=1)))
    res = score_dpg_answers(item, [{2: True}], "official", skip_first_row=True)
    assert not res.skipped and res.score == 1.0 and res.category_scores == {"entity": [1.0]}


def test_grid_crops_are_the_official_boxes_and_invert_make_grid():
    images = torch.arange(4 * 3 * 5 * 5, dtype=torch.int64).reshape(4, 3, 5, 5).to(torch.uint8)
    grid = make_grid_2x2(images)
    assert grid.shape == (3, 10, 10)
    crops = grid_crops(grid, 5)
    assert all(torch.equal(c, images[i]) for i, c in enumerate(crops))
    assert torch.equal(grid[:, 0:5, 5:10], images[1])  # (R, 0, 2R, R) = top-right
    assert len(grid_crops(grid, 5, pic_num=1)) == 1


# ---- tiny random BLIP VQA through the user path ----------------------------------------------------------------
@pytest.fixture(scope="module")
def blips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blip")
    return {a: save_tiny_blip_vqa(root / f"blip_{a}", answer=a) for a in ("yes", "no")}


def test_blip_backend_answers_and_yes_probability(blips):
    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8)
    questions = ["is there a dog?", "is the cat red?", "unknown words here?"]
    yes = BlipVQA(str(blips["yes"]), device="cpu", max_new_tokens=1, batch_size=2)
    assert yes.answer(images, questions) == ["yes"] * 3
    assert yes.yes_probability(images, questions).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    no = BlipVQA(str(blips["no"]), device="cpu", max_new_tokens=1)
    assert no.answer(images, questions) == ["no"] * 3
    assert no.yes_probability(images, questions).max() < 1e-6
    assert all(not p.requires_grad for p in no.model.parameters()) and not no.model.training


def test_dpg_reward_hard_and_soft(blips, tmp_path):
    from htgrpo.data.loaders import load_dpg

    prompts, csv_path = write_benchmark(tmp_path)
    items = load_dpg(prompts, csv_path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    hard = DPGReward(BlipVQA(str(blips["yes"]), device="cpu", max_new_tokens=1), mode="hard", device="cpu")
    out = hard.score(images, items)
    assert out.scores.tolist() == [1.0, 1.0] and set(out.components) == {"dpg/score"}
    soft = DPGReward(BlipVQA(str(blips["no"]), device="cpu"), mode="soft", device="cpu")
    assert soft.score(images, items).scores.max() < 1e-5


def test_missing_vqa_weights_name_the_key_and_the_repo(compose, tmp_path):
    from htgrpo.config import ConfigError, call_checked, instantiate_node

    prompts, csv_path = write_benchmark(tmp_path)
    cfg = compose("evaluate", ["benchmark=dpg", f"benchmark.prompts.prompts_path={prompts}",
                               f"benchmark.prompts.csv_path={csv_path}", "policy=random"])
    benchmark = instantiate_node(cfg, "benchmark")  # cheap: nothing loaded yet
    with pytest.raises(ConfigError) as err:
        call_checked(benchmark.prepare, "benchmark.scorer")  # as htgrpo.evaluate calls it
    assert str(err.value).startswith("benchmark.scorer.vqa.model:") and "Salesforce/blip-vqa-base" in str(err.value)
    # reward=dpg loads at start-up, so the error names the reward's key (not NaN rewards later)
    cfg = compose("fit", ["experiment=shapes_ht", "reward=dpg"])
    with pytest.raises(ConfigError, match=r"^reward\.vqa\.model: .*Salesforce/blip-vqa-base"):
        instantiate_node(cfg, "reward")


@pytest.mark.parametrize("answer,expected", [("yes", 100.0), ("no", 0.0)])
def test_evaluate_dpg_end_to_end_with_tiny_blip(compose, blips, tmp_path, answer, expected):
    from htgrpo.evaluate import run

    prompts, csv_path = write_benchmark(tmp_path)
    out = tmp_path / "run"
    cfg = compose("evaluate", [
        "benchmark=dpg", f"benchmark.prompts.prompts_path={prompts}", f"benchmark.prompts.csv_path={csv_path}",
        f"benchmark.scorer.vqa.model={blips[answer]}", "+benchmark.scorer.vqa.max_new_tokens=1",
        "benchmark.scorer.vqa.device=cpu", "benchmark.scorer.skip_first_row=false", "policy=random",
        "save_images=true", f"paths.output_dir={out}",
    ])
    results = run(cfg)
    assert results["overall"] == pytest.approx(expected) and results["num_prompts"] == 2
    assert set(results["categories"].values()) == {expected}
    from PIL import Image

    grid = Image.open(out / "images" / "A.png")  # the official 2x2 grid of the prompt's 4 images
    assert grid.size[0] == grid.size[1] and grid.size[0] % 2 == 0


@pytest.mark.parametrize("chat_template", [True, False])
def test_yes_no_logit_vlm_backend_batched_equals_one_by_one(tmp_path, chat_template):
    folder = save_tiny_llava(tmp_path / "llava", chat_template=chat_template)
    vqa = YesNoLogitVQA(str(folder), device="cpu", batch_size=3)
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    questions = ["is there a dog ?", "is the cat red ?", "is there a red dog with a cat ?"]  # different lengths
    batched = vqa.yes_probability(images, questions)
    single = torch.cat([vqa.yes_probability(images[i:i + 1], questions[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)  # padding does not change an answer
    assert ((batched > 0) & (batched < 1)).all()
    assert vqa.answer(images, questions) == ["yes" if p > 0.5 else "no" for p in batched.tolist()]
    assert "<image>" in vqa._text("is there a dog ?")
    # by hand: softmax over the yes/no token logits at the last prompt position of example 0
    enc = vqa.processor(images=[vqa_image(images[0])], text=[vqa._text(questions[0])], return_tensors="pt")
    with torch.no_grad():
        logits = vqa.model(**enc).logits[0, -1]
    yes, no = logits[vqa.yes_ids].logsumexp(0), logits[vqa.no_ids].logsumexp(0)
    assert float(batched[0]) == pytest.approx(float(torch.sigmoid(yes - no)), abs=1e-5)


def vqa_image(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_reward_dpg_drives_a_two_step_shapes_ht_fit(compose, blips, tmp_path):
    import csv as _csv

    from htgrpo.fit import run
    from test_rewards import TINY_RL, _without_hydra

    cfg = compose("fit", ["experiment=shapes_ht", *TINY_RL, "data=shapes_dpg", "reward=dpg", "reward.mode=soft",
                          f"reward.vqa.model={blips['yes']}", "reward.vqa.device=cpu", "reward.device=cpu",
                          f"paths.output_dir={tmp_path}"])
    assert run(_without_hydra(cfg))["steps"] == 2
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = [r for r in _csv.DictReader(fh) if r.get("train/nonfinite_rewards")]
    assert len(rows) == 2
    for row in rows:  # the "yes" model says yes to every ShapesWorld question: p(yes) ~ 1
        assert float(row["train/nonfinite_rewards"]) == 0
        assert float(row["train/reward/dpg/soft"]) == pytest.approx(1.0, abs=1e-4)
