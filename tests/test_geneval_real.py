"""GenEval with a real detector pipeline: tiny random Mask2Former + CLIP saved in their release formats and loaded
back through the user path; the official results.jsonl read back by a re-implementation of summary_scores.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.geneval_vocab import GENEVAL_OBJECT_NAMES
from htgrpo.data.loaders import load_geneval_metadata
from htgrpo.data.records import GENEVAL_COLORS, GenEvalRecord, GenEvalRequirement, MetadataError
from htgrpo.rewards.geneval_real import (
    GENEVAL_COLOR_TEMPLATES,
    GenEvalDetectorScorer,
    GenEvalReward,
    instance_postprocess,
    mask_to_box,
)
from tiny_scorers import save_tiny_clip, save_tiny_mask2former

SHAPES = {0: "circle", 1: "square", 2: "triangle"}
COCO_SPELLING = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
"""GenEval's renamings of COCO classes: a COCO checkpoint's ``id2label`` may use COCO's names for these indices."""
COCO_NAMES = [COCO_SPELLING.get(n, n) for n in GENEVAL_OBJECT_NAMES]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny detectors (COCO's 80 classes with COCO's spelling in ``id2label``, every query a "dog"; ShapesWorld
    classes, every query a "circle"), a tiny CLIP, and GenEval's ``object_names.txt`` written from the package's list
    (so the module needs no copy of the GenEval repository)."""
    root = tmp_path_factory.mktemp("scorers")
    names_file = root / "object_names.txt"
    names_file.write_text("".join(f"{n}\n" for n in GENEVAL_OBJECT_NAMES))
    return {
        "coco_dog": save_tiny_mask2former(root / "m2f_coco", dict(enumerate(COCO_NAMES)), favour="dog"),
        "shapes_circle": save_tiny_mask2former(root / "m2f_shapes", SHAPES, favour="circle"),
        "clip": save_tiny_clip(root / "clip"),
        "names": names_file,
    }


def rec(tag: str, prompt: str, *include: GenEvalRequirement, exclude: tuple = ()) -> GenEvalRecord:
    return GenEvalRecord(tag, prompt, tuple(include), tuple(exclude))


DOG = rec("single_object", "a photo of a dog", GenEvalRequirement("dog", 1))
CAT = rec("single_object", "a photo of a cat", GenEvalRequirement("cat", 1))
RED_DOG = rec("colors", "a photo of a red dog", GenEvalRequirement("dog", 1, color="red"))
DOG_AND_CAT = rec("two_object", "a photo of a dog and a cat", GenEvalRequirement("dog", 1), GenEvalRequirement("cat", 1))


# ---- pure pieces, hand-computed -----------------------------------------------------------------------------
def test_mask_to_box_is_mmdets_mask2bbox():
    mask = np.zeros((6, 5), dtype=bool)
    mask[2:5, 1:4] = True  # rows 2..4, columns 1..3
    assert mask_to_box(mask) == (1.0, 2.0, 4.0, 5.0)
    assert mask_to_box(np.zeros((3, 3), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)


def test_instance_postprocess_scores_are_class_prob_times_mask_score():
    # 2 queries, 2 classes (+ no-object). Query 0: softmax([ln 6, ln 3, ln 1]) = (0.6, 0.3, 0.1); query 1: (0.2, 0.2, 0.6).
    class_logits = torch.log(torch.tensor([[6.0, 3.0, 1.0], [2.0, 2.0, 6.0]]))
    # Query 0's mask: logits +ln 3 on 2 pixels (sigmoid 0.75), -1 elsewhere -> mask score 0.75.
    # Query 1's mask: logit +ln 9 on 1 pixel (sigmoid 0.9) -> mask score 0.9.
    mask_logits = torch.full((2, 2, 2), -1.0)
    mask_logits[0, 0, :] = math.log(3.0)
    mask_logits[1, 1, 1] = math.log(9.0)
    labels, scores, masks = instance_postprocess(class_logits, mask_logits, max_per_image=3)
    # top-3 class probabilities: (q0, c0) 0.6, (q0, c1) 0.3, then a 0.2 of query 1
    assert labels[:2].tolist() == [0, 1]
    assert scores[:2].tolist() == pytest.approx([0.6 * 0.75, 0.3 * 0.75], rel=1e-5)
    assert float(scores[2]) == pytest.approx(0.2 * 0.9, rel=1e-5)
    assert masks[0].tolist() == [[True, True], [False, False]] and scores.dtype == torch.float32


# ---- the pipeline on tiny random models -----------------------------------------------------------------------
def test_tiny_pipeline_detects_the_favoured_class_and_classifies_colours(models):
    scorer = GenEvalDetectorScorer(detector=str(models["coco_dog"]), clip=str(models["clip"]),
                                   class_names=str(models["names"]), device="cpu")
    images = torch.randint(0, 256, (4, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    results = scorer.score(images, [DOG, CAT, RED_DOG, DOG_AND_CAT])
    assert results[0].correct and results[0].partial == 1.0 and results[0].reason == ""
    assert not results[1].correct and results[1].reason == "expected cat>=1, found 0"
    assert not results[3].correct and results[3].partial == 0.5
    # details: GenEval's [x1, y1, x2, y2, score] per kept detection, only dogs, best first, all above 0.3
    dogs = results[0].details["dog"]
    assert set(results[0].details) == {"dog"} and 1 <= len(dogs) <= 16
    assert all(len(d) == 5 and d[4] > 0.3 and 0 <= d[0] <= d[2] <= 56 and 0 <= d[1] <= d[3] <= 40 for d in dogs)
    assert [d[4] for d in dogs] == sorted((d[4] for d in dogs), reverse=True)
    # colour: the official recipe restated independently (open_clip's transform, clip_benchmark's classifier)
    (color,) = results[2].colors["dog"]
    assert color in GENEVAL_COLORS
    assert results[2].correct == (color == "red")
    found = scorer.detector.detect(images[2:3])[0]
    best = int(np.argmax(found.scores))
    want = _official_colour_logits(scorer.colors.model, str(models["clip"]), images[2], [found.boxes[best]],
                                   [found.masks[best]], "dog")
    got = scorer.colors.color_logits(images[2].permute(1, 2, 0).numpy(), [found.boxes[best]], [found.masks[best]],
                                     "dog")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert color == OFFICIAL_COLORS[int(want[0].argmax())]


# GenEval evaluate_images.py's facts, restated here rather than imported from the code under test
OFFICIAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
OFFICIAL_TEMPLATES = ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _official_colour_logits(clip, clip_dir: str, image: torch.Tensor, boxes, masks, classname: str) -> torch.Tensor:
    """GenEval's colour step, independently of htgrpo's pre-processing: ``ImageCrops`` (mask composited on #999 with
    numpy, PIL ``crop(box)``), open_clip's own eval transform (here at the tiny CLIP's 32 px with OpenAI's mean/std),
    open_clip-style text input (a fixed 77-token context padded after the end token; the CLIP text tower is causal,
    so the padding does not reach the pooled end token), clip_benchmark's ``zero_shot_classifier`` and
    ``run_classification`` logits ``100 · normalize(image) @ classifier``."""
    from open_clip.transform import image_transform
    from PIL import Image
    from transformers import CLIPTokenizer

    transform = image_transform(32, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    pixels = []
    for box, mask in zip(boxes, masks):
        rgb = image.permute(1, 2, 0).numpy()
        composite = np.where(np.asarray(mask, dtype=bool)[..., None], rgb, np.array([153, 153, 153], np.uint8))
        pixels.append(transform(Image.fromarray(composite.astype(np.uint8)).crop(tuple(box[:4]))))
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        columns = []
        for c in OFFICIAL_COLORS:
            ids = [tokenizer(t.format(c=c, cls=classname))["input_ids"] for t in OFFICIAL_TEMPLATES]
            ids = torch.tensor([row + [end] * (77 - len(row)) for row in ids])
            text = clip.get_text_features(input_ids=ids)
            text = text if isinstance(text, torch.Tensor) else text.pooler_output
            mean = torch.nn.functional.normalize(text, dim=-1).mean(0)
            columns.append(mean / mean.norm())
        img = clip.get_image_features(pixel_values=torch.stack(pixels))
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        return 100.0 * torch.nn.functional.normalize(img, dim=-1) @ torch.stack(columns, dim=1)


def test_colour_crops_use_open_clips_transform_for_every_box_shape(models):
    """Crops of many shapes (odd and even margins left after the resize, where the Hugging Face processor's centre
    crop lands one pixel off open_clip's): the classifier's logits equal the independent official recipe's."""
    scorer = GenEvalDetectorScorer(detector=str(models["coco_dog"]), clip=str(models["clip"]),
                                   class_names=str(models["names"]), device="cpu")
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 60, 60), dtype=np.uint8))
    boxes = [(2.0, 3.0, 28.0, 45.0), (0.0, 0.0, 23.0, 21.0), (10.4, 5.6, 48.0, 47.0), (1.0, 2.0, 40.0, 17.0),
             (5.0, 9.0, 15.0, 50.0), (0.0, 0.0, 60.0, 60.0)]
    masks = [rng.random((60, 60)) > 0.3 for _ in boxes]
    got = scorer.colors.color_logits(image.permute(1, 2, 0).numpy(), boxes, masks, "cat")
    want = _official_colour_logits(scorer.colors.model, str(models["clip"]), image, boxes, masks, "cat")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_max_overlap_option_runs_nms_on_the_detector_output(models):
    kwargs = dict(detector=str(models["coco_dog"]), clip=str(models["clip"]), class_names=str(models["names"]), device="cpu")
    images = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    all_dogs = GenEvalDetectorScorer(**kwargs).score(images, [DOG])[0].details["dog"]
    nms_dogs = GenEvalDetectorScorer(max_overlap=0.0, **kwargs).score(images, [DOG])[0].details["dog"]
    # max_overlap=0 drops every box whose IoU with a kept one is >= 0, i.e. all but the best one.
    assert len(all_dogs) > 1 and nms_dogs == all_dogs[:1]


def test_reward_binary_and_partial_with_components(models):
    reward = GenEvalReward(mode="partial", detector=str(models["coco_dog"]), clip=str(models["clip"]),
                           class_names=str(models["names"]), device="cpu")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = reward.score(images, [DOG, CAT, DOG_AND_CAT])
    assert out.scores.tolist() == [1.0, 0.0, 0.5]
    assert out.components["geneval/correct"].tolist() == [1.0, 0.0, 0.0]
    assert reward.mode == "partial" and not isinstance(reward, torch.nn.Module)
    assert all(not p.requires_grad for p in reward.scorer.detector.model.parameters())
    assert not reward.scorer.colors.model.training


# ---- class list --------------------------------------------------------------------------------------------
def test_without_class_names_an_80_class_detector_uses_genevals_names_and_a_file_beside_the_metadata_wins(models, tmp_path):
    from htgrpo.data.prompt_sets import GenEvalPrompts

    scorer = GenEvalDetectorScorer(detector=str(models["coco_dog"]), clip=str(models["clip"]), device="cpu")
    assert scorer.detector.model.config.id2label[65] == "remote"  # COCO's spelling in the checkpoint
    assert scorer.class_names == list(GENEVAL_OBJECT_NAMES) and scorer.class_names[65] == "tv remote"
    remote = rec("single_object", "a photo of a tv remote", GenEvalRequirement("tv remote", 1))
    scorer.check_records([("record 0", remote)])  # GenEval's name is known: no MetadataError
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps(remote.to_json()) + "\n")
    scorer.use_prompt_set(GenEvalPrompts(str(meta)))  # no object_names.txt beside it: the package list stays
    assert scorer.class_names == list(GENEVAL_OBJECT_NAMES)
    # an object_names.txt beside the metadata is the benchmark's own list: it replaces the default
    beside = [*GENEVAL_OBJECT_NAMES[:16], "puppy", *GENEVAL_OBJECT_NAMES[17:]]
    (tmp_path / "object_names.txt").write_text("".join(f"{n}\n" for n in beside))
    scorer.use_prompt_set(GenEvalPrompts(str(meta)))
    assert scorer.class_names == beside and scorer.detector.class_names == beside


def test_without_class_names_a_detector_of_another_size_keeps_its_id2label(models):
    scorer = GenEvalDetectorScorer(detector=str(models["shapes_circle"]), clip=str(models["clip"]), device="cpu")
    assert scorer.class_names == ["circle", "square", "triangle"]


# ---- start-up errors ----------------------------------------------------------------------------------------
def test_metadata_line_with_a_class_the_detector_lacks_fails_with_file_and_line(models, tmp_path):
    lines = [DOG.to_json(), CAT.to_json(), rec("single_object", "a photo of a unicorn", GenEvalRequirement("unicorn", 1)).to_json()]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from htgrpo.data.prompt_sets import GenEvalPrompts

    scorer = GenEvalDetectorScorer(detector=str(models["coco_dog"]), clip=str(models["clip"]),
                                   class_names=str(models["names"]), device="cpu")
    with pytest.raises(MetadataError, match=rf"{meta}:3: key 'include\[0\].class': found 'unicorn'"):
        scorer.check_prompt_set(GenEvalPrompts(str(meta)))
    # inside `fit` (no prepare() call), the first validation batch checks the whole set the same way
    from htgrpo.evaluation.benchmark import Benchmark

    benchmark = Benchmark(GenEvalPrompts(str(meta)), scorer, images_per_prompt=1)
    first = benchmark.prompts.prompts[:1]
    with pytest.raises(MetadataError, match=rf"{meta}:3: "):
        benchmark.score(first, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_evaluate_stops_at_start_up_on_a_bad_metadata_line(compose, models, tmp_path):
    from htgrpo.evaluate import run

    meta = tmp_path / "prompts" / "evaluation_metadata.jsonl"
    meta.parent.mkdir()
    bad = rec("two_object", "a photo of a dog and a unicorn", GenEvalRequirement("dog", 1), GenEvalRequirement("unicorn", 1))
    meta.write_text("".join(json.dumps(r.to_json()) + "\n" for r in (DOG, CAT, bad)))
    # no class_names: GenEval's object_names.txt next to the metadata is used
    (meta.parent / "object_names.txt").write_text(models["names"].read_text())
    cfg = compose("evaluate", ["benchmark=geneval", f"benchmark.prompts.path={meta.parent}",
                               f"benchmark.scorer.detector={models['coco_dog']}", f"benchmark.scorer.clip={models['clip']}",
                               "benchmark.scorer.device=cpu", "policy=random", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(MetadataError, match=rf"{meta}:3: key 'include\[1\].class': found 'unicorn'"):
        run(cfg)
    assert not (tmp_path / "run" / "results.jsonl").exists()  # nothing was generated


def test_missing_weights_name_the_key_and_the_repo(compose, tmp_path):
    cfg = compose("evaluate", ["benchmark=geneval", f"benchmark.prompts.path={tmp_path}", "policy=random",
                               "benchmark.scorer.device=cpu"])
    (tmp_path / "evaluation_metadata.jsonl").write_text(json.dumps(DOG.to_json()) + "\n")
    benchmark = instantiate_node(cfg, "benchmark")  # cheap: nothing is loaded yet
    from htgrpo.config import call_checked

    with pytest.raises(ConfigError) as err:
        call_checked(benchmark.prepare, "benchmark.scorer")
    msg = str(err.value)
    assert msg.startswith("benchmark.scorer.detector:")
    assert "facebook/mask2former-swin-small-coco-instance" in msg and "huggingface-cli download" in msg
    # reward=geneval loads when built (start-up of fit): the error names the reward's key
    cfg = compose("fit", ["experiment=shapes_ht", "reward=geneval", "reward.device=cpu"])
    with pytest.raises(ConfigError, match=r"^reward\.detector: .*facebook/mask2former-swin-small-coco-instance"):
        instantiate_node(cfg, "reward")


# ---- evaluate end to end, and the official results.jsonl ---------------------------------------------------
def official_summary(path: Path) -> dict[str, float]:
    """GenEval's summary_scores.py re-done without pandas: rows grouped by ``tag`` in first-seen order
    (``groupby(sort=False)``), task score = mean ``correct``, overall = mean of task scores; prompts are
    grouped by the ``metadata`` string."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in rows:
        assert isinstance(r["metadata"], str) and isinstance(r["details"], str)
        json.loads(r["metadata"]), json.loads(r["details"])
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        by_prompt.setdefault(r["metadata"], []).append(bool(r["correct"]))
    tasks = {t: sum(v) / len(v) for t, v in by_tag.items()}
    return {"overall": sum(tasks.values()) / len(tasks), **tasks, "images": len(rows), "prompts": len(by_prompt),
            "correct_prompts": sum(any(v) for v in by_prompt.values()) / len(by_prompt)}


def test_evaluate_geneval_end_to_end_writes_the_official_results(compose, models, tmp_path):
    from htgrpo.evaluate import run

    meta = tmp_path / "prompts" / "evaluation_metadata.jsonl"
    meta.parent.mkdir()
    meta.write_text("".join(json.dumps(r.to_json()) + "\n" for r in (DOG, CAT, RED_DOG, DOG_AND_CAT)))
    out = tmp_path / "run"
    cfg = compose("evaluate", [
        "benchmark=geneval", f"benchmark.prompts.path={meta}", f"benchmark.scorer.detector={models['coco_dog']}",
        f"benchmark.scorer.clip={models['clip']}", f"benchmark.scorer.class_names={models['names']}",
        "benchmark.scorer.device=cpu", "benchmark.images_per_prompt=2", "policy=random", "save_images=true",
        f"paths.output_dir={out}",
    ])
    results = run(cfg)
    summary = official_summary(out / "results.jsonl")
    assert summary["images"] == 8 and summary["prompts"] == 4
    assert summary["single_object"] == 0.5 and summary["two_object"] == 0.0
    assert results["tasks"] == {k: summary[k] for k in ("single_object", "two_object", "colors")}
    assert results["overall"] == pytest.approx(summary["overall"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert json.loads(rows[0]["metadata"]) == DOG.to_json()
    # the images are in GenEval's layout and the metadata next to them reads back as the record
    assert Path(rows[0]["filename"]) == out / "images" / "00000" / "samples" / "0000.png"
    assert load_geneval_metadata(out / "images" / "00003" / "metadata.jsonl")[0] == DOG_AND_CAT
    assert (out / "images" / "00003" / "samples" / "0001.png").exists()


def test_reward_geneval_drives_a_two_step_shapes_ht_fit(compose, models, tmp_path):
    import csv

    from htgrpo.fit import run
    from test_rewards import TINY_RL, _without_hydra

    cfg = compose("fit", ["experiment=shapes_ht", *TINY_RL, "reward=geneval", f"reward.detector={models['shapes_circle']}",
                          f"reward.clip={models['clip']}", "reward.device=cpu", f"paths.output_dir={tmp_path}"])
    assert run(_without_hydra(cfg))["steps"] == 2
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/nonfinite_rewards")]
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/nonfinite_rewards"]) == 0
        assert 0.0 <= float(row["train/reward/geneval/partial"]) <= 1.0
        assert math.isfinite(float(row["train/loss"]))
