"""Tests for htgrpo.data.loaders: the official GenEval / DPG-Bench files and malformed inputs."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pytest

from htgrpo.data.loaders import (
    load_dpg,
    load_dpg_csv,
    load_dpg_prompts,
    load_geneval_metadata,
    parse_geneval_record,
    to_benchmark_prompts,
    write_dpg_csv,
    write_geneval_metadata,
)
from htgrpo.data.records import (
    DPG_CSV_COLUMNS,
    DPGItem,
    DPGProposition,
    GenEvalRecord,
    GenEvalRequirement,
    MetadataError,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HTGRPO_SHARED_DATA", REPO.parent / "shared" / "data"))
GENEVAL_FILE = SHARED_DATA / "geneval" / "evaluation_metadata.jsonl"
DPG_DIR = SHARED_DATA / "dpg_bench"

needs_geneval = pytest.mark.skipif(
    not GENEVAL_FILE.is_file(),
    reason=f"official GenEval metadata not found at {GENEVAL_FILE} (set HTGRPO_SHARED_DATA to the shared/data folder)",
)
needs_dpg = pytest.mark.skipif(
    not (DPG_DIR / "prompts").is_dir() or not (DPG_DIR / "prompts.jsonl").is_file(),
    reason=f"DPG-Bench prompts not found under {DPG_DIR} (set HTGRPO_SHARED_DATA to the shared/data folder)",
)


# ------------------------------------------------------------------------------------------------
# official files
# ------------------------------------------------------------------------------------------------


@needs_geneval
def test_official_geneval_metadata():
    recs = load_geneval_metadata(GENEVAL_FILE)
    assert len(recs) == 553
    assert Counter(r.tag for r in recs) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    with_exclude = [r for r in recs if r.exclude]
    assert len(with_exclude) == 80 and all(r.tag == "counting" for r in with_exclude)
    assert all(r.exclude[0].count == r.include[0].count + 1 for r in with_exclude)
    pos = [r for r in recs if r.tag == "position"]
    assert all(r.include[1].position is not None and r.include[1].position[1] == 0 for r in pos)
    # the folder form resolves to the same file
    assert load_geneval_metadata(GENEVAL_FILE.parent) == recs


@needs_geneval
def test_official_geneval_round_trip_is_byte_identical(tmp_path):
    recs = load_geneval_metadata(GENEVAL_FILE)
    out = write_geneval_metadata(recs, tmp_path / "evaluation_metadata.jsonl")
    assert out.read_bytes() == GENEVAL_FILE.read_bytes()
    # writing into a folder uses the official name
    assert write_geneval_metadata(recs[:3], tmp_path).name == "evaluation_metadata.jsonl"


@needs_geneval
def test_geneval_benchmark_prompts():
    recs = load_geneval_metadata(GENEVAL_FILE)
    bp = to_benchmark_prompts(recs, "geneval")
    assert [b.key for b in bp[:2]] == ["00000", "00001"] and bp[-1].key == "00552"
    assert all(b.group == r.tag and b.prompt == r.prompt and b.record is r for b, r in zip(bp, recs))


@needs_dpg
def test_official_dpg_prompts_folder_and_index_agree():
    from_folder = load_dpg_prompts(DPG_DIR / "prompts")
    assert len(from_folder) == 1065
    assert [i.item_id for i in from_folder] == sorted(i.item_id for i in from_folder)
    assert load_dpg_prompts(DPG_DIR / "prompts.jsonl") == from_folder
    assert load_dpg_prompts(DPG_DIR) == from_folder  # parent folder -> prompts/
    assert load_dpg(DPG_DIR, None) == from_folder  # generation-only
    assert all(i.prompt and i.prompt == i.prompt.strip() and not i.propositions for i in from_folder)
    bp = to_benchmark_prompts(from_folder, "dpg")
    assert {b.group for b in bp} == {"dpg"} and bp[0].key == from_folder[0].item_id


# ------------------------------------------------------------------------------------------------
# GenEval malformed inputs
# ------------------------------------------------------------------------------------------------

GOOD = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "counting",
        "include": [{"class": "orange", "count": 3}],
        "exclude": [{"class": "orange", "count": 4}],
        "prompt": "a photo of three oranges",
    },
    {
        "tag": "position",
        "include": [{"class": "cake", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a dog right of a cake",
    },
    {
        "tag": "color_attr",
        "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "cup", "count": 1, "color": "blue"}],
        "prompt": "a photo of a red car and a blue cup",
    },
]


def _write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def _bad(tmp_path, third, *keys):
    """Write GOOD[:2] + third as line 3 and return the error message."""
    f = _write_jsonl(tmp_path / "meta.jsonl", [*GOOD[:2], third])
    with pytest.raises(MetadataError) as ei:
        load_geneval_metadata(f)
    msg = str(ei.value)
    assert "meta.jsonl:3" in msg, msg
    for k in keys:
        assert k in msg, msg
    return msg


def test_geneval_good_records_round_trip(tmp_path):
    f = _write_jsonl(tmp_path / "meta.jsonl", GOOD)
    recs = load_geneval_metadata(f)
    assert recs[2].include[1] == GenEvalRequirement("dog", 1, None, ("right of", 0))
    assert recs[3].include[0].color == "red" and recs[1].exclude == (GenEvalRequirement("orange", 4),)
    out = write_geneval_metadata(recs, tmp_path / "out" / "meta.jsonl")
    assert out.read_bytes() == f.read_bytes()


def test_geneval_bad_json(tmp_path):
    msg = _bad(tmp_path, '{"tag": "colors", "include": [', "invalid JSON")
    assert "column" in msg


def test_geneval_unknown_tag(tmp_path):
    _bad(tmp_path, {**GOOD[0], "tag": "shape"}, "'tag'", '"shape"', "single_object")


def test_geneval_count_zero(tmp_path):
    rec = {**GOOD[3], "include": [GOOD[3]["include"][0], {"class": "cup", "count": 0}]}
    _bad(tmp_path, rec, "include[1].count", "found 0", ">= 1")


def test_geneval_colour_not_in_list(tmp_path):
    rec = {**GOOD[3], "include": [{"class": "car", "count": 1, "color": "magenta"}]}
    _bad(tmp_path, rec, "include[0].color", '"magenta"', "purple")


def test_geneval_position_target_out_of_range(tmp_path):
    rec = {**GOOD[2], "include": [GOOD[2]["include"][0], {"class": "dog", "count": 1, "position": ["above", 1]}]}
    _bad(tmp_path, rec, "include[1].position", '["above", 1]', "earlier include entry")
    rec = {**GOOD[2], "include": [GOOD[2]["include"][0], {"class": "dog", "count": 1, "position": ["near", 0]}]}
    _bad(tmp_path, rec, "include[1].position", '"near"', "left of")


def test_geneval_missing_include(tmp_path):
    _bad(tmp_path, {"tag": "colors", "prompt": "a photo of a red car"}, "'include'", "missing")
    _bad(tmp_path, {"tag": "colors", "include": [], "prompt": "x"}, "'include'", "non-empty")


def test_geneval_unknown_key(tmp_path):
    _bad(tmp_path, {**GOOD[0], "seed": 3}, "'seed'", "unknown key")
    rec = {**GOOD[1], "exclude": [{"class": "orange", "count": 4, "colour": "red"}]}
    _bad(tmp_path, rec, "exclude[0].colour", "unknown key")


def test_geneval_other_errors(tmp_path):
    _bad(tmp_path, {**GOOD[0], "prompt": ""}, "'prompt'")
    _bad(tmp_path, {**GOOD[0], "include": [{"class": "bench", "count": True}]}, "include[0].count")
    _bad(tmp_path, "[1, 2]", "<record>")
    _bad(tmp_path, '{"tag": "colors", "tag": "colors"}', "'tag'", "twice")
    # blank line in the middle
    f = tmp_path / "blank.jsonl"
    f.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n")
    with pytest.raises(MetadataError, match=r"blank\.jsonl:2: blank line"):
        load_geneval_metadata(f)
    # parse_geneval_record used directly
    with pytest.raises(MetadataError, match=r"^src:9: key 'include\[0\]\.position'"):
        parse_geneval_record({**GOOD[0], "include": [{"class": "a", "count": 1, "position": ["above", 0]}]}, "src:9")
    # invalid in-memory records are refused by the writer and nothing is written
    bad = GenEvalRecord("colors", "p", (GenEvalRequirement("car", 1, "teal"),))
    with pytest.raises(MetadataError, match=r"records\[0\].*include\[0\]\.color"):
        write_geneval_metadata([bad], tmp_path / "never.jsonl")
    assert not (tmp_path / "never.jsonl").exists()


def test_geneval_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        load_geneval_metadata(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(ei.value) and "prompts/evaluation_metadata.jsonl" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="evaluation_metadata.jsonl"):
        load_geneval_metadata(tmp_path)


# ------------------------------------------------------------------------------------------------
# DPG-Bench: hand-written items, CSV round trip and malformed inputs
# ------------------------------------------------------------------------------------------------


def _prop(pid, deps, tup, q, broad="", detailed=""):
    return DPGProposition(pid, tuple(deps), broad, detailed, tup, q)


ITEMS = [
    DPGItem(
        "alpha",
        'A red cube, left of a "blue" sphere.',
        (
            _prop(1, [0], "entity - whole (cube)", "Is there a cube?", "entity", "whole"),
            _prop(2, [0], "entity - whole (sphere)", "Is there a sphere?", "entity", "whole"),
            _prop(3, [1], "attribute - color (cube, red)", "Is the cube red?", "attribute", "color"),
            _prop(4, [1, 2], "relation - spatial (cube, sphere, left of)", "Is the cube left of the sphere?",
                  "relation", "spatial"),
        ),
        keywords="cube, sphere",
    ),
    DPGItem(
        "beta10",
        "Three green triangles,\non a white canvas.",
        (
            _prop(1, [0], "entity - whole (triangle)", "Are there triangles?", "entity", "whole"),
            _prop(2, [1], "other - count (triangle, ==3)", "Are there three triangles?", "other", "count"),
            _prop(3, [0], "global - (white canvas)", "Is the background white?", "global", ""),
        ),
    ),
]


def _write_prompts(folder: Path, items) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for it in items:
        (folder / f"{it.item_id}.txt").write_text(it.prompt)
    return folder


def test_dpg_csv_round_trip(tmp_path):
    csv_path = write_dpg_csv(ITEMS, tmp_path / "dpg_bench.csv")
    header = csv_path.read_text().splitlines()[0]
    assert header == ",".join(DPG_CSV_COLUMNS)
    table = load_dpg_csv(csv_path)
    assert list(table) == ["alpha", "beta10"]
    assert table["alpha"] == ITEMS[0].propositions  # first data row kept (no ELLA #61 off-by-one)
    assert table["beta10"] == ITEMS[1].propositions
    assert table["alpha"][3].parents == (1, 2) and table["alpha"][0].parents == ()
    assert load_dpg_csv(tmp_path) == table  # folder form
    prompts = _write_prompts(tmp_path / "prompts", ITEMS)
    assert load_dpg(prompts, csv_path) == ITEMS
    assert load_dpg(tmp_path, tmp_path) == ITEMS  # parent folders


def test_dpg_csv_categories_from_tuple_and_order(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text(
        ",".join(DPG_CSV_COLUMNS) + "\n"
        "x,prompt,,2, 1 ,,,\"attribute - color (cat, black)\",Is the cat black?\n"
        "x,prompt,,1,0,,,entity - whole (cat),Is there a cat?\n"
        "x,prompt,,3,0,,,global - (dusk),Is it dusk?\n"
    )
    props = load_dpg_csv(f)["x"]
    assert [p.proposition_id for p in props] == [1, 2, 3]
    assert (props[0].category_broad, props[0].category_detailed) == ("entity", "whole")
    assert (props[1].category_broad, props[1].category_detailed, props[1].dependency) == ("attribute", "color", (1,))
    assert (props[2].category_broad, props[2].category_detailed) == ("global", "")


def _csv_error(tmp_path, text: str, *needles):
    f = tmp_path / "bad_dpg.csv"
    f.write_text(text)
    with pytest.raises(MetadataError) as ei:
        load_dpg_csv(f)
    msg = str(ei.value)
    assert "bad_dpg.csv" in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


HEADER = ",".join(DPG_CSV_COLUMNS) + "\n"
ROW1 = "x,p,,1,0,entity,whole,entity - whole (cat),Is there a cat?\n"


def test_dpg_csv_missing_column(tmp_path):
    header = ",".join(c for c in DPG_CSV_COLUMNS if c != "dependency") + ",extra\n"
    _csv_error(tmp_path, header + ROW1, "bad_dpg.csv:1", "header", "missing columns ['dependency']", "'extra'")


def test_dpg_csv_non_integer_proposition_id(tmp_path):
    row = "x,p,,two,1,entity,whole,entity - whole (dog),Is there a dog?\n"
    _csv_error(tmp_path, HEADER + ROW1 + row, "bad_dpg.csv:3", "'proposition_id'", '"two"')


def test_dpg_csv_dangling_dependency(tmp_path):
    row = "x,p,,2,\"1,7\",attribute,color,attribute - color (cat),Is the cat black?\n"
    _csv_error(tmp_path, HEADER + ROW1 + row, "bad_dpg.csv:3", "'dependency'", '"1,7"', "7 does not exist")


def test_dpg_csv_other_errors(tmp_path):
    # line numbers count physical lines: a quoted multi-line text moves the next record down
    row_ml = 'x,"multi\nline",,2,0,entity,whole,entity - whole (dog),Is there a dog?\n'
    row = "x,p,,3,abc,entity,whole,entity - whole (hat),Is there a hat?\n"
    _csv_error(tmp_path, HEADER + ROW1 + row_ml + row, "bad_dpg.csv:5", "'dependency'", '"abc"')
    _csv_error(tmp_path, HEADER + ROW1 + ROW1, "bad_dpg.csv:3", "'proposition_id'", "line 2 already has it")
    _csv_error(tmp_path, HEADER + "x,p,,1,0\n", "bad_dpg.csv:2", "'<row>'", "5 fields")
    _csv_error(tmp_path, HEADER + "x,p,,0,0,entity,whole,entity - whole (a),Q?\n", "bad_dpg.csv:2", "'proposition_id'")
    _csv_error(tmp_path, HEADER + "x,p,,1,0,,,,Q?\n", "bad_dpg.csv:2", "'tuple'")
    _csv_error(tmp_path, HEADER, "no question rows")


def test_dpg_csv_missing_file_and_split_items(tmp_path):
    with pytest.raises(FileNotFoundError, match="ELLA"):
        load_dpg_csv(tmp_path / "dpg_bench.csv")
    f = tmp_path / "split.csv"
    f.write_text(HEADER + ROW1 + ROW1.replace("x,", "y,", 1) + ROW1.replace(",1,0,", ",2,1,").replace("cat", "hat"))
    with pytest.warns(UserWarning, match="not contiguous"):
        table = load_dpg_csv(f)
    assert [p.proposition_id for p in table["x"]] == [1, 2]


def test_dpg_empty_prompt_file(tmp_path):
    folder = _write_prompts(tmp_path / "prompts", ITEMS)
    (folder / "gamma.txt").write_text("  \n")
    with pytest.raises(MetadataError) as ei:
        load_dpg_prompts(folder)
    assert "gamma.txt" in str(ei.value) and "empty" in str(ei.value)


def test_dpg_prompt_index_errors(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"item_id": "a", "prompt": "x"}\n{"item_id": "b", "prompt": ""}\n')
    with pytest.raises(MetadataError, match=r"prompts\.jsonl:2: key 'prompt'"):
        load_dpg_prompts(f)
    f.write_text('{"item_id": "a", "prompt": "x"}\n{"item_id": "a", "prompt": "y"}\n')
    with pytest.raises(MetadataError, match=r"prompts\.jsonl:2: key 'item_id'.*once"):
        load_dpg_prompts(tmp_path)
    with pytest.raises(FileNotFoundError, match="dpg_bench/prompts"):
        load_dpg_prompts(tmp_path / "missing")


def test_load_dpg_join_errors(tmp_path):
    csv_path = write_dpg_csv(ITEMS, tmp_path / "dpg_bench.csv")
    only_alpha = _write_prompts(tmp_path / "p1", ITEMS[:1])
    with pytest.raises(MetadataError, match=r"without a prompt.*'beta10'"):
        load_dpg(only_alpha, csv_path)
    extra = _write_prompts(tmp_path / "p2", [*ITEMS, DPGItem("zeta", "lonely prompt")])
    with pytest.raises(MetadataError, match=r"prompts without questions.*'zeta'.*csv_path=None"):
        load_dpg(extra, csv_path)
    changed = _write_prompts(tmp_path / "p3", [ITEMS[0], DPGItem("beta10", "another text")])
    with pytest.warns(UserWarning, match="beta10"):
        items = load_dpg(changed, csv_path)
    assert items[1].prompt == "another text" and items[1].propositions == ITEMS[1].propositions


def test_write_dpg_csv_refuses_bad_items(tmp_path):
    with pytest.raises(MetadataError, match="propositions"):
        write_dpg_csv([DPGItem("a", "p")], tmp_path / "x.csv")
    dangling = DPGItem("a", "p", (_prop(1, [2], "entity - whole (a)", "Q?"),))
    with pytest.raises(MetadataError, match="dependency"):
        write_dpg_csv([dangling], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_to_benchmark_prompts_rejects_mixed_and_duplicates():
    rec = GenEvalRecord("single_object", "a photo of a cat", (GenEvalRequirement("cat", 1),))
    with pytest.raises(TypeError):
        to_benchmark_prompts([rec, ITEMS[0]], "mixed")
    with pytest.raises(MetadataError, match="duplicates"):
        to_benchmark_prompts([ITEMS[0], ITEMS[0]], "dpg")
    assert to_benchmark_prompts([], "dpg") == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_benchmark_prompts([rec], "g")[0].key == "00000"
