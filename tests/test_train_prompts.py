"""Held-out training prompts: the GenEval-style generator, and fit's start-up stop on train/validation overlap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from htgrpo.config import ConfigError, instantiate_node
from htgrpo.data.geneval_train import (
    generate_geneval_training_prompts,
    split_quota,
    task_pool,
    task_specs,
    template_prompt,
    template_record,
)
from htgrpo.data.geneval_vocab import GENEVAL_OBJECT_NAMES
from htgrpo.data.loaders import load_geneval_metadata, write_geneval_metadata
from htgrpo.data.train_val_overlap import prompt_key
from htgrpo.data.records import GENEVAL_TASKS, GenEvalRecord, GenEvalRequirement
from htgrpo.prompts import main as prompts_main


def _synthetic_eval(path: Path) -> Path:
    """A small evaluation file: two single_object prompts, a counting and a position prompt (GenEval's forms)."""
    R = GenEvalRequirement
    records = [
        GenEvalRecord("single_object", "a photo of a dog", (R("dog", 1),)),
        GenEvalRecord("single_object", "a photo of an umbrella", (R("umbrella", 1),)),
        GenEvalRecord("counting", "a photo of three sheeps", (R("sheep", 3),), (R("sheep", 4),)),
        GenEvalRecord("position", "a photo of a cat left of a bench",
                      (R("bench", 1), R("cat", 1, position=("left of", 0)))),
    ]
    return write_geneval_metadata(records, path)


# ---- the generator ----------------------------------------------------------------------------------------------


def test_the_same_seed_writes_the_same_file_and_another_seed_another(tmp_path):
    eval_file = _synthetic_eval(tmp_path / "eval.jsonl")
    paths = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        paths.append(prompts_main(["geneval_train", f"out={tmp_path / name}.jsonl", "n=300", f"seed={seed}",
                                   f"exclude={eval_file}"]))
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c
    records = load_geneval_metadata(paths[0])  # the strict loader fit uses: the schema holds
    assert len(records) == 300 and len({r.prompt for r in records}) == 300
    assert Counter(r.tag for r in records) == {t: 50 for t in GENEVAL_TASKS}  # 300 shared equally over six tasks


def test_no_prompt_of_a_synthetic_evaluation_file_is_written(tmp_path, capsys):
    eval_file = _synthetic_eval(tmp_path / "eval.jsonl")
    # single_object has 80 template prompts, 2 of them evaluation prompts: asking for 78 must give exactly the others
    out = prompts_main(["geneval_train", f"out={tmp_path / 'single.jsonl'}", "n=78", "seed=0",
                        f"exclude={eval_file}", "tasks=single_object"])
    written = {r.prompt for r in load_geneval_metadata(out)}
    assert len(written) == 78
    assert written == {r.prompt for r in task_pool("single_object")} - {"a photo of a dog", "a photo of an umbrella"}
    with pytest.raises(SystemExit, match="asked for 79 prompts but the tasks hold only 78"):
        prompts_main(["geneval_train", f"out={tmp_path / 'x.jsonl'}", "n=79", f"exclude={eval_file}",
                      "tasks=single_object"])
    # every task, a large draw: none of the four evaluation prompts, counted per task in the printed table
    capsys.readouterr()
    out = prompts_main(["geneval_train", f"out={tmp_path / 'all.jsonl'}", "n=2000", "seed=1", f"exclude={eval_file}"])
    held = {prompt_key(r.prompt) for r in load_geneval_metadata(eval_file)}
    assert not [r.prompt for r in load_geneval_metadata(out) if prompt_key(r.prompt) in held]
    printed = capsys.readouterr().out
    assert "| single_object | 80 | 2 | 78 |" in printed and "| counting | 240 | 1 | 239 |" in printed


def test_no_prompt_of_the_official_evaluation_file_is_written(tmp_path, shared_data, capsys):
    official = shared_data / "geneval" / "evaluation_metadata.jsonl"
    out = prompts_main(["geneval_train", f"out={tmp_path}", "n=3000", "seed=0", f"exclude={official}"])
    assert out.name == "train_metadata.jsonl"
    held = {prompt_key(r.prompt) for r in load_geneval_metadata(official)}
    train = load_geneval_metadata(out)
    assert len(train) == 3000 and not [r for r in train if prompt_key(r.prompt) in held]
    tags = Counter(r.tag for r in train)
    assert "single_object" not in tags  # all 80 single_object prompts are evaluation prompts
    assert tags["counting"] == 160 and tags["colors"] == 696  # whole held-out pools: 240 - 80, 790 - 94
    assert "single_object: all 80 of its prompts are evaluation prompts" in capsys.readouterr().out


def test_templates_give_every_official_record_exactly(shared_data):
    """Each of GenEval's 553 evaluation records is a record of its task's template pool, metadata and all: the
    templates, names, colours, counts and relations are GenEval's."""
    official = load_geneval_metadata(shared_data / "geneval" / "evaluation_metadata.jsonl")
    pools = {t: {template_prompt(t, spec): spec for spec in task_specs(t)} for t in GENEVAL_TASKS}
    assert [len(pools[t]) for t in GENEVAL_TASKS] == [80, 80 * 79, 80 * 3, 79 * 10, 80 * 79 * 4, 79 * 78 * 10 * 9]
    for record in official:
        ours = template_record(record.tag, pools[record.tag][record.prompt])
        assert ours.to_json() == record.to_json(), record.prompt
    names = (shared_data / "geneval" / "object_names.txt").read_text().splitlines()
    assert tuple(n.strip() for n in names if n.strip()) == GENEVAL_OBJECT_NAMES


def test_template_records_follow_genevals_forms():
    """Without the official file: GenEval's article, plural, count and position conventions on a few records."""
    counting = {r.prompt: r for r in task_pool("counting")}
    assert counting["a photo of two buses"].exclude == (GenEvalRequirement("bus", 3),)
    assert counting["a photo of four sheeps"].include == (GenEvalRequirement("sheep", 4),)
    position = {r.prompt: r for r in task_pool("position")}["a photo of an apple above a tv"]
    assert json.loads(json.dumps(position.to_json()))["include"] == [
        {"class": "tv", "count": 1}, {"class": "apple", "count": 1, "position": ["above", 0]}]
    colour_specs = task_specs("colors") + task_specs("color_attr")
    assert not [s for s in colour_specs if "person" in s]  # GenEval gives a person no colour
    assert "a photo of an orange orange" in {r.prompt for r in task_pool("colors")}


def test_split_quota_shares_equally_and_refills_from_small_tasks():
    assert split_quota(10, {"a": 1, "b": 100, "c": 100}) == {"a": 1, "b": 5, "c": 4}
    assert split_quota(7, {"a": 0, "b": 3, "c": 3, "d": 9}) == {"a": 0, "b": 3, "c": 2, "d": 2}
    assert split_quota(15, {"a": 0, "b": 3, "c": 3, "d": 9}) == {"a": 0, "b": 3, "c": 3, "d": 9}
    with pytest.raises(ValueError, match="asked for 16"):
        split_quota(16, {"a": 0, "b": 3, "c": 3, "d": 9})


def test_generator_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="exclude is required"):
        prompts_main(["geneval_train", f"out={tmp_path / 'x.jsonl'}", "n=10"])
    with pytest.raises(SystemExit, match="unknown argument 'num=10'"):
        prompts_main(["geneval_train", f"out={tmp_path / 'x.jsonl'}", "num=10", "exclude=none"])
    with pytest.raises(SystemExit, match="unknown task"):
        prompts_main(["geneval_train", f"out={tmp_path / 'x.jsonl'}", "n=10", "exclude=none", "tasks=colour"])
    with pytest.raises(SystemExit, match="does not exist"):
        prompts_main(["geneval_train", f"out={tmp_path / 'x.jsonl'}", "n=10", f"exclude={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="n must be an integer"):
        generate_geneval_training_prompts(0, seed=0)


# ---- fit stops when training and validation prompts overlap -------------------------------------------------------


def test_fit_mmada_ht_stops_at_startup_when_training_is_the_validation_file(tmp_path):
    """`python -m htgrpo.fit experiment=mmada_ht data.train.path=F benchmark.prompts.path=F` ends at start-up with
    the overlap message, before any weights load (the policy's checkpoint here does not even exist)."""
    from test_cli import run_cli

    eval_file = _synthetic_eval(tmp_path / "eval.jsonl")
    proc = run_cli("htgrpo.fit", ["experiment=mmada_ht", f"data.train.path={eval_file}",
                                  f"benchmark.prompts.path={eval_file}", f"policy.pretrained={tmp_path / 'none'}",
                                  f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Configuration error: data.train: 4 of the 4 training prompts are validation prompts" in text
    assert f"'a photo of a dog' ({eval_file}:1)" in text and "data.allow_train_val_overlap=true" in text
    assert "Traceback" not in text


def test_the_switch_allows_overlap_on_purpose(compose, tmp_path, caplog):
    """`data.allow_train_val_overlap=true`: the same composition passes the check (fit goes on to the policy), with a
    warning naming the count."""
    import logging

    from omegaconf import open_dict

    from htgrpo.fit import run

    eval_file = _synthetic_eval(tmp_path / "eval.jsonl")
    cfg = compose("fit", ["experiment=mmada_ht", f"data.train.path={eval_file}", f"benchmark.prompts.path={eval_file}",
                          "data.allow_train_val_overlap=true", f"policy.pretrained={tmp_path / 'none'}"])
    with open_dict(cfg):  # as fit.run gets it inside @hydra.main
        cfg.pop("hydra", None)
        cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="htgrpo.data.train_val_overlap"), pytest.raises(ConfigError) as err:
        run(cfg)
    assert err.value.key == "policy.pretrained"  # past the data check: the next thing built is the policy
    assert "4 of the 4 training prompts are validation prompts" in caplog.text


def test_held_out_training_prompts_pass_the_check(compose, tmp_path):
    """The README's flow: generate with exclude=<validation file>, train on it, validate on the official file."""
    eval_file = _synthetic_eval(tmp_path / "eval.jsonl")
    train = prompts_main(["geneval_train", f"out={tmp_path / 'train.jsonl'}", "n=78", f"exclude={eval_file}",
                          "tasks=single_object"])
    cfg = compose("fit", ["experiment=mmada_ht", f"data.train.path={train}", f"benchmark.prompts.path={eval_file}"])
    benchmark = instantiate_node(cfg, "benchmark")
    datamodule = instantiate_node(cfg, "data", val_prompts=benchmark.prompts)
    assert len(datamodule.train_dataset()) == 78
    # the same file with one evaluation prompt appended overlaps by exactly that one
    leak = [*load_geneval_metadata(train), load_geneval_metadata(eval_file)[1]]
    write_geneval_metadata(leak, tmp_path / "leak.jsonl")
    cfg = compose("fit", ["experiment=mmada_ht", f"data.train.path={tmp_path / 'leak.jsonl'}",
                          f"benchmark.prompts.path={eval_file}"])
    expected = r"1 of the 79 training prompts .* 'a photo of an umbrella' \(.*leak.jsonl:79\)"
    with pytest.raises(ConfigError, match=expected) as err:
        instantiate_node(cfg, "data", val_prompts=instantiate_node(cfg, "benchmark").prompts)
    assert err.value.key == "data.train"


def test_allow_switch_must_be_a_boolean(compose, tmp_path):
    eval_file = _synthetic_eval(tmp_path / "eval.jsonl")
    cfg = compose("fit", ["experiment=mmada_ht", f"data.train.path={eval_file}", f"benchmark.prompts.path={eval_file}",
                          "data.allow_train_val_overlap=yes"])
    with pytest.raises(ConfigError) as err:
        instantiate_node(cfg, "data", val_prompts=instantiate_node(cfg, "benchmark").prompts)
    assert err.value.key == "data.allow_train_val_overlap"


def test_prompt_key_ignores_case_and_spacing():
    assert prompt_key("  A photo of\ta  Dog ") == prompt_key("a photo of a dog") == "a photo of a dog"


# ---- ShapesWorld: the training stream holds the validation prompts out -----------------------------------------


def test_shapes_main_command_trains_on_no_validation_prompt(compose, caplog):
    """`experiment=shapes_ht` as fit builds it: 2400 training prompts, none a validation prompt; the tasks whose whole
    prompt space is in the validation set are named at start-up and not drawn; the others are, in the stratified mix."""
    import logging

    cfg = compose("fit", ["experiment=shapes_ht"])
    val = instantiate_node(cfg, "benchmark").prompts
    with caplog.at_level(logging.INFO, logger="htgrpo.data.datamodules"):
        datamodule = instantiate_node(cfg, "data", val_prompts=val)
    stream = datamodule.train_source
    train = [stream[i].prompt for i in range(2400)]
    val_keys = {prompt_key(p.prompt) for p in val}
    assert not [p.prompt for p in train if prompt_key(p.prompt) in val_keys]
    assert stream.exhausted_tasks == ("single_object", "two_object", "counting")
    assert Counter(p.group for p in train) == {"colors": 800, "position": 800, "color_attr": 800}
    assert Counter(p.group for p in train[:6]) == {"colors": 2, "position": 2, "color_attr": 2}  # each batch of 6
    assert "hold out the 84 validation prompts" in caplog.text and "single_object, two_object, counting" in caplog.text
    # every held-out-free prompt of the tasks trained on is reachable (colors: 30 - 19 validation prompts)
    from htgrpo.data.shapes.prompts import geneval_task_prompts

    for task in ("colors", "position"):
        free = {p for p in geneval_task_prompts(stream.world, task) if prompt_key(p) not in val_keys}
        assert {p.prompt for p in train if p.group == task} == free


def test_shapes_overlap_switch_keeps_the_whole_prompt_space(compose):
    """`data.allow_train_val_overlap=true` (the warm starts' setting): example i is the stream's original example i,
    validation prompts included."""
    from htgrpo.data.prompt_sets import ShapesPromptStream

    cfg = compose("fit", ["experiment=shapes_ht", "data.allow_train_val_overlap=true"])
    val = instantiate_node(cfg, "benchmark").prompts
    stream = instantiate_node(cfg, "data", val_prompts=val).train_source
    plain = ShapesPromptStream(stream.world, seed=1000, task_weights=dict(stream.task_weights),
                               task_schedule="stratified")
    assert [stream[i].prompt.prompt for i in range(60)] == [plain[i].prompt.prompt for i in range(60)]
    val_keys = {prompt_key(p.prompt) for p in val}
    assert sum(prompt_key(stream[i].prompt.prompt) in val_keys for i in range(240)) > 100
    assert compose("fit", ["experiment=shapes_pretrain"]).data.allow_train_val_overlap is True


def test_shapes_stream_redraws_held_out_prompts_and_refuses_an_empty_stream():
    from htgrpo.data.prompt_sets import ShapesPromptStream
    from htgrpo.data.shapes.palette import ShapesWorldConfig
    from htgrpo.data.shapes.prompts import geneval_task_prompts

    world = ShapesWorldConfig()
    held = ["A photo of a  circle", "a photo of a square"]  # compared by prompt_key
    stream = ShapesPromptStream(world, seed=3, task_weights={"single_object": 1}, held_out=held)
    assert {stream[i].prompt.prompt for i in range(50)} == {"a photo of a triangle"}
    assert stream.exhausted_tasks == ()
    everything = geneval_task_prompts(world, "single_object")
    with pytest.raises(ConfigError) as err:
        ShapesPromptStream(world, seed=3, task_weights={"single_object": 1}, held_out=everything)
    assert err.value.key == "task_weights" and "single_object" in str(err.value)
    mixed = ShapesPromptStream(world, seed=3, task_weights={"single_object": 1, "colors": 1}, held_out=everything)
    assert mixed.exhausted_tasks == ("single_object",) and {mixed[i].prompt.group for i in range(40)} == {"colors"}
