"""MMaDA-8B and Lumina-DiMOO end to end on tiny random checkpoints in the released formats (no downloads).

The checkpoints come from ``python -m htgrpo.tiny_checkpoint`` (the same files a user smoke-tests a cluster with) and
load through the same builders as the real ones (``policy=mmada`` / ``policy=dimoo``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, shared_data_dir
from htgrpo.config import ConfigError, instantiate_node
from htgrpo.policies.pretrained import (
    DIMOO_SPECIALS,
    DIMOO_TEMPLATE,
    MMADA_SPECIALS,
    build_dimoo_policy,
    build_mmada_policy,
    parse_resolution,
    resolve_special_ids,
)
from htgrpo.policies.t2i_layout import MASKED, DimooSequenceLayout

GENEVAL = shared_data_dir() / "geneval" / "evaluation_metadata.jsonl"
PROMPT = "a photo of a red cat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{model: (folder, override string)} written by the tiny_checkpoint command's main()."""
    from htgrpo.tiny_checkpoint import main

    root = tmp_path_factory.mktemp("tiny")
    return {m: (root / m, main([m, str(root / m)])) for m in ("mmada", "dimoo")}


@pytest.fixture(scope="module")
def mmada(tiny):
    return build_mmada_policy(str(tiny["mmada"][0]), str(tiny["mmada"][0] / "magvitv2"), resolution=64,
                              max_text_len=32, dtype="float32").eval()


@pytest.fixture(scope="module")
def dimoo(tiny):
    return build_dimoo_policy(str(tiny["dimoo"][0]), resolution=[32, 64], max_text_len=64, dtype="float32").eval()


def overrides(tiny, model: str) -> list[str]:
    return tiny[model][1].split()


@pytest.fixture(scope="module")
def geneval_train(tmp_path_factory) -> Path:
    """Training prompts held out from the official file, as the README makes them:
    `python -m htgrpo.prompts geneval_train out=FILE n=60 seed=0 exclude=<official evaluation_metadata.jsonl>`."""
    from htgrpo.prompts import main

    return main(["geneval_train", f"out={tmp_path_factory.mktemp('prompts') / 'train.jsonl'}", "n=60", "seed=0",
                 f"exclude={GENEVAL}"])


# ----------------------------------------------------------------------------------------------------------------
# The released formats
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_checkpoints_have_the_released_files(tiny, capsys):
    mm, dm = tiny["mmada"][0], tiny["dimoo"][0]
    cfg = json.loads((mm / "config.json").read_text())
    assert cfg["model_type"] == "mmada" and cfg["architectures"] == ["MMadaModelLM"]
    assert cfg["auto_map"]["AutoConfig"] == "configuration_llada.LLaDAConfig"
    assert cfg["codebook_size"] == 8192 and cfg["embedding_size"] == cfg["new_vocab_size"]
    dcfg = json.loads((dm / "config.json").read_text())
    assert dcfg["model_type"] == "llada" and dcfg["architectures"] == ["LLaDAForMultiModalGeneration"]
    for folder in (mm, dm):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
        assert "model.transformer.blocks.0.q_proj.weight" in index["weight_map"]
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert (mm / "magvitv2" / "config.json").is_file()
    assert (dm / "vqvae" / "config.json").is_file() and (dm / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    assert tiny["mmada"][1].startswith(f"policy=mmada policy.pretrained={mm} policy.vq_model={mm / 'magvitv2'}")
    assert tiny["dimoo"][1].startswith(f"policy=dimoo policy.pretrained={dm}")


# ----------------------------------------------------------------------------------------------------------------
# Token-by-token templates (cond and uncond)
# ----------------------------------------------------------------------------------------------------------------


def test_mmada_sequence_is_the_documented_template(mmada):
    tok = mmada.text_tokenizer
    n = mmada.num_image_tokens
    assert n == 16  # 64 px / 16 -> 4 x 4
    pt = mmada.encode_prompts([PROMPT])
    canvas = torch.full((1, n), MASKED)
    words = tok.tokenizer.tokenize(PROMPT)
    for uncond, text in ((False, words), (True, [])):
        ids, attn = mmada.sequences(canvas, pt, uncond=uncond)
        body = ["<|t2i|>", "<|startoftext|>", *text, "<|endoftext|>", "<|soi|>", *["<|mdm_mask|>"] * n, "<|eoi|>"]
        pads = ids.shape[1] - len(body)
        assert tok.convert_ids_to_tokens(ids[0].tolist()) == ["[iPAD]"] * pads + body
        assert attn[0].tolist() == [0] * pads + [1] * len(body)
        assert ids.shape[1] == 32 + 1 + 1 + n + 1  # MMaDA: (L+1) + <soi> + N + <eoi>
    # image codes: code + len(tokenizer), read at [-(N+1):-1]
    codes = torch.arange(n)[None]
    ids, _ = mmada.sequences(codes, pt)
    assert ids[0, -(n + 1):-1].tolist() == [len(tok) + c for c in range(n)]
    assert mmada.layout.image_positions == slice(ids.shape[1] - n - 1, ids.shape[1] - 1)


def test_dimoo_sequence_is_the_documented_template(dimoo):
    tok = dimoo.text_tokenizer
    rows, cols = dimoo.layout.grid
    assert (rows, cols) == (2, 4)  # 32 x 64 px: non-square
    pt = dimoo.encode_prompts([PROMPT])
    canvas = torch.full((1, rows * cols), MASKED)
    image_part = (["<|mdm_mask|>"] * cols + ["<|newline|>"]) * rows
    for uncond, user in ((False, PROMPT), (True, "<uncondition>")):
        ids, attn = dimoo.sequences(canvas, pt, uncond=uncond)
        text = DIMOO_TEMPLATE.format(prompt=user)
        body = [*tok.tokenizer.tokenize(text), "<answer>", "<Image>", *image_part, "</Image>", "</answer>"]
        pads = ids.shape[1] - len(body)
        got = tok.convert_ids_to_tokens(ids[0].tolist())
        assert got == ["<|pad|>"] * pads + body
        assert got[pads] == "<system>" and got[-(len(image_part) + 5)] == "</user>"
        assert attn[0].tolist() == [0] * pads + [1] * len(body)
    # codes sit between the newlines at code + (LM-head width - codebook), DiMOO's released offset rule
    codes = torch.arange(rows * cols)[None]
    ids, _ = dimoo.sequences(codes, pt)
    offset = dimoo.backbone.lm_head_weight.shape[0] - 8192
    assert dimoo.layout.image_token_offset == offset
    assert ids[0, dimoo.layout.image_positions].tolist() == [offset + c for c in range(rows * cols)]
    start = dimoo.layout.code_start
    assert ids[0, start + cols].item() == dimoo.layout.newline  # row 0 ends with the newline


def test_documented_ids_are_the_defaults_when_the_checkpoint_stores_none():
    class Bare:  # a tokenizer that names none of the specials
        bos_token_id = eos_token_id = pad_token_id = None

        def token_id(self, token):
            return None

    mm = resolve_special_ids(MMADA_SPECIALS, {}, Bare(), None, "pretrained")
    assert mm == {"pad": 126093, "t2i": 126088, "bos": 126080, "eos": 126081, "soi": 126084, "eoi": 126085,
                  "mask": 126336}
    dm = resolve_special_ids(DIMOO_SPECIALS, {}, Bare(), None, "pretrained")
    assert (dm["newline"], dm["answer_start"], dm["answer_end"], dm["boi"], dm["eoi"], dm["mask"]) == (
        126084, 126354, 126355, 126349, 126350, 126336)
    layout = DimooSequenceLayout(image_token_offset=134548 - 8192, codebook_size=8192, rows=64, cols=64,
                                 max_text_len=8, uncond_ids=(1, 2), **dm)
    assert layout.image_token_offset == 126356
    assert layout.seq_len == 8 + 2 + 64 * 65 + 2  # 1024 px: 4096 codes + 64 newlines + 4 wrappers + prompt


def test_dimoo_batching_with_padding_mask_reproduces_single_prompt_logits(dimoo):
    """padding_mask=True: a prompt's logits in a left-padded batch equal its logits alone (released B=1 sampling);
    padding_mask=False attends the pads, as the released model would on a padded batch."""
    n = dimoo.num_image_tokens
    canvas = torch.full((2, n), MASKED)
    canvas[:, :3] = torch.tensor([5, 6, 7])
    batch = dimoo.encode_prompts(["a cat", "a photo of a purple giraffe and an orange umbrella"])
    with torch.no_grad():
        both = dimoo.image_logits(canvas, batch)
        alone = dimoo.image_logits(canvas[:1], dimoo.encode_prompts(["a cat"]))
        torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-4)
        released = DimooSequenceLayout(**{**dimoo.layout.__dict__, "padding_mask": False})
        dimoo.layout, kept = released, dimoo.layout
        try:
            unmasked = dimoo.image_logits(canvas, batch)
        finally:
            dimoo.layout = kept
    assert not torch.allclose(unmasked[:1], alone, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Start-up failures
# ----------------------------------------------------------------------------------------------------------------


def test_bad_resolution_fails_with_the_key(compose, tiny):
    assert parse_resolution([768, 1536]) == (768, 1536)
    for bad in (500, [512, 500], 0, "big"):
        with pytest.raises(ConfigError) as err:
            parse_resolution(bad)
        assert err.value.key == "resolution"
    cfg = compose("fit", [*overrides(tiny, "dimoo"), "policy.resolution=[64,72]"])
    with pytest.raises(ConfigError, match=r"^policy\.resolution: .*multiple of 16"):
        instantiate_node(cfg, "policy")


def test_wrong_model_type_fails_with_the_key(tiny):
    with pytest.raises(ConfigError, match="model_type='llada'.*policy=mmada expects model_type in \\['mmada'\\]") as err:
        build_mmada_policy(str(tiny["dimoo"][0]), str(tiny["mmada"][0] / "magvitv2"), resolution=64)
    assert err.value.key == "pretrained"
    with pytest.raises(ConfigError, match="model_type='mmada'") as err:
        build_dimoo_policy(str(tiny["mmada"][0]), resolution=64)
    assert err.value.key == "pretrained"


def test_mismatched_special_tokens_fail_with_the_key(tiny, tmp_path):
    bad = tmp_path / "bad_mmada"
    shutil.copytree(tiny["mmada"][0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mask_token_id"] = cfg["mask_token_id"] + 1  # config and tokenizer now disagree about [MASK]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"special tokens do not match: mask is config.json mask_token_id = \d+, "
                                          r"tokenizer '<\|mdm_mask\|>' = \d+") as err:
        build_mmada_policy(str(bad), str(bad / "magvitv2"), resolution=64)
    assert err.value.key == "pretrained"
    # an explicit id is the documented way out of a checkpoint that disagrees with itself
    policy = build_mmada_policy(str(bad), str(bad / "magvitv2"), resolution=64, max_text_len=32, dtype="float32",
                                special_tokens={"mask": cfg["mask_token_id"] - 1})
    assert policy.layout.mask == cfg["mask_token_id"] - 1
    # a tokenizer that is too big for the checkpoint's LM head: codes would not fit
    cfg["mask_token_id"] -= 1
    cfg["embedding_size"] = cfg["vocab_size"] = 500
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"image codes would occupy ids \[\d+, \d+\) but the model's LM head has only 500"):
        build_mmada_policy(str(bad), str(bad / "magvitv2"), resolution=64)


def test_missing_weights_is_one_clear_message(compose, tmp_path, monkeypatch):
    """Offline, the default hub id fails at start-up with the key, the repo id and the download command (the entry
    points print a ConfigError as one line, no traceback: see test_cli)."""
    from htgrpo.generate import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "evaluation_metadata.jsonl"  # one official-format line: no dependence on the shared data
    prompts.write_text('{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}\n')
    cfg = compose("generate", ["policy=mmada", f"prompts.path={prompts}", f"out={tmp_path / 'o'}", "limit=1"])
    with pytest.raises(ConfigError) as err:
        run(cfg)
    msg = str(err.value)
    assert msg.startswith("policy.pretrained: cannot load checkpoint 'Gen-Verse/MMaDA-8B-Base' (HF_HUB_OFFLINE is set")
    assert "`hf download Gen-Verse/MMaDA-8B-Base --local-dir /path/to/MMaDA-8B-Base`" in msg
    assert "pass `policy.pretrained=/path/to/MMaDA-8B-Base`" in msg
    assert not (tmp_path / "o").exists()  # nothing was generated
    # the image tokenizer of a local backbone folder: names its own key and repo
    with pytest.raises(ConfigError, match=r"policy\.vq_model=.*hf download showlab/magvitv2") as e:
        from htgrpo.policies.pretrained import _load_image_tokenizer

        _load_image_tokenizer("htgrpo.policies.image_tokenizers.MagvitImageTokenizer", str(tmp_path / "nope"),
                              "vq_model", None)
    assert e.value.key == "vq_model"


# ----------------------------------------------------------------------------------------------------------------
# Sampling, persistence, rollout micro-batches
# ----------------------------------------------------------------------------------------------------------------


def test_samplers_run_on_both_models_and_decode(mmada, dimoo, compose):
    for name, policy in (("mmada", mmada), ("dimoo", dimoo)):
        cfg = compose("fit", [f"sampler={name}", "sampler.num_steps=3"])
        settings = instantiate_node(cfg, "sampler")
        for s in (settings, instantiate_node(compose("fit", ["sampler=emerge", "sampler.num_steps=3"]), "sampler")):
            out = s.sample(policy, policy.encode_prompts([PROMPT, "two dogs"]), generator=torch.Generator().manual_seed(0))
            assert out.codes.shape == (2, policy.num_image_tokens) and bool((out.codes >= 0).all())
            images = policy.image_tokenizer.decode(out.codes)
            assert images.dtype == torch.uint8 and images.shape[1] == 3
    assert instantiate_node(compose("fit", ["sampler=mmada"]), "sampler").noise_anneal == "compound"
    dimoo_sampler = instantiate_node(compose("fit", ["sampler=dimoo"]), "sampler")
    assert (dimoo_sampler.num_steps, dimoo_sampler.guidance_scale, dimoo_sampler.noise_anneal) == (64, 4.0, "none")


def test_rollout_micro_batches(mmada):
    from htgrpo.algorithms.rollout import sample_in_micro_batches
    from htgrpo.policies.generators import SamplerSettings

    sampler = SamplerSettings(name="maskgit", num_steps=2, guidance_scale=1.0)
    prompts = mmada.encode_prompts([PROMPT, "two dogs", "a bench", "a red car", "a clock"])
    whole = sample_in_micro_batches(sampler, mmada, prompts, torch.Generator().manual_seed(3), None)
    direct = sampler.sample(mmada, prompts, generator=torch.Generator().manual_seed(3))
    assert torch.equal(whole.codes, direct.codes)
    parts = sample_in_micro_batches(sampler, mmada, prompts, torch.Generator().manual_seed(3), 2)
    again = sample_in_micro_batches(sampler, mmada, prompts, torch.Generator().manual_seed(3), 2)
    assert parts.codes.shape == (5, 16) and torch.equal(parts.codes, again.codes)
    assert bool((parts.commit_step >= 0).all()) and parts.num_steps == 2
    # each chunk is an independent call: chunk 0 equals sampling its 2 prompts alone with the same generator
    first = sampler.sample(mmada, prompts[0:2], generator=torch.Generator().manual_seed(3))
    assert torch.equal(parts.codes[:2], first.codes)


def test_real_policy_save_and_load_round_trip(dimoo, tmp_path):
    from htgrpo.policies.masked_diffusion import MaskedDiffusionPolicy

    dimoo.save_pretrained(tmp_path / "saved")
    loaded = MaskedDiffusionPolicy.from_pretrained(tmp_path / "saved").eval()
    assert loaded.layout == dimoo.layout
    canvas = torch.full((1, dimoo.num_image_tokens), MASKED)
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_logits(canvas, loaded.encode_prompts([PROMPT])),
                                   dimoo.image_logits(canvas, dimoo.encode_prompts([PROMPT])))
    codes = torch.randint(0, 8192, (2, dimoo.num_image_tokens))
    assert torch.equal(loaded.image_tokenizer.decode(codes), dimoo.image_tokenizer.decode(codes))


# ----------------------------------------------------------------------------------------------------------------
# The user's own commands
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not GENEVAL.exists(), reason="official GenEval metadata not found")
def test_fit_mmada_ht_command(tiny, geneval_train, tmp_path):
    """python -m htgrpo.fit experiment=mmada_ht <tiny overrides> reward=jpeg_compressibility data.train.path=...
    benchmark.prompts.path=... trainer.max_steps=2 validate_at_start=false validate_at_end=false (the README's smoke
    command)."""
    from test_cli import run_cli

    out = tmp_path / "run"
    proc = run_cli("htgrpo.fit", ["experiment=mmada_ht", *overrides(tiny, "mmada"), "reward=jpeg_compressibility",
                                  f"data.train.path={geneval_train}", f"benchmark.prompts.path={GENEVAL}",
                                  "trainer.max_steps=2", "validate_at_start=false",
                                  "validate_at_end=false", "sampler.num_steps=2", "policy.lora.r=4",
                                  f"hydra.run.dir={out}"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1  # one rollout step = K = 6 optimiser updates >= max_steps
    assert "mmada_ht: 1 steps" in proc.stdout


@pytest.mark.skipif(not GENEVAL.exists(), reason="official GenEval metadata not found")
@pytest.mark.parametrize("experiment", ["mmada_ht", "dimoo_ht"])
def test_fit_ht_experiment_in_process(experiment, tiny, geneval_train, compose, tmp_path):
    """mmada_ht / dimoo_ht through fit.run: the code path of `python -m htgrpo.fit experiment=... <tiny overrides>
    reward=jpeg_compressibility data.train.path=... benchmark.prompts.path=... trainer.max_steps=2
    validate_at_start=false validate_at_end=false`
    (the real command runs in test_fit_mmada_ht_command, marked slow, and in the README)."""
    from omegaconf import open_dict

    from htgrpo.fit import run

    model = experiment.split("_")[0]
    cfg = compose("fit", [f"experiment={experiment}", *overrides(tiny, model), "reward=jpeg_compressibility",
                          f"data.train.path={geneval_train}", f"benchmark.prompts.path={GENEVAL}",
                          "trainer.max_steps=2", "validate_at_start=false",
                          "validate_at_end=false", "sampler.num_steps=2", "policy.gradient_checkpointing=false",
                          "policy.lora.r=0", "logger=csv", "callbacks.progress_bar=null"])
    with open_dict(cfg):  # as fit.run gets it inside @hydra.main: no hydra node, a run folder
        cfg.pop("hydra", None)
        cfg.paths.output_dir = str(tmp_path)
        cfg.trainer.default_root_dir = str(tmp_path)
    summary = run(cfg)
    assert summary["steps"] == 1 and (tmp_path / "summary.json").exists()
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert rows and all(float(r["train/reward/mean"]) < 0 for r in rows)  # JPEG size in kB, negated


@pytest.mark.skipif(not GENEVAL.exists(), reason="official GenEval metadata not found")
@pytest.mark.parametrize("experiment", ["mmada_ht", "mmada_maskgrpo", "mmada_unigrpo", "mmada_trace", "dimoo_ht",
                                        "dimoo_maskgrpo"])
def test_real_model_experiments_compose_and_instantiate(experiment, tiny, geneval_train, compose):
    """Every mmada_* / dimoo_* experiment builds its policy (tiny checkpoint), data, benchmark and algorithm; it
    trains on held-out prompts and the benchmark validates on the official ones (its models load lazily)."""
    model = experiment.split("_")[0]
    cfg = compose("fit", [f"experiment={experiment}", *overrides(tiny, model), f"data.train.path={geneval_train}",
                          f"benchmark.prompts.path={GENEVAL}",
                          "policy.lora.r=0", "policy.gradient_checkpointing=false", "reward=jpeg_compressibility"])
    assert cfg.policy.lora.alpha == 64 and cfg.algorithm.num_generations == 9 and cfg.algorithm.lr == 3.0e-6
    assert compose("fit", [f"experiment={experiment}"]).policy.lora.r == 128  # MaskGRPO's LoRA rank by default
    benchmark = instantiate_node(cfg, "benchmark")
    assert benchmark.kind == "geneval" and len(benchmark.prompts) == 553
    datamodule = instantiate_node(cfg, "data", val_prompts=benchmark.prompts)
    assert len(next(iter(datamodule.train_dataloader()))) == cfg.data.batch_size
    policy = instantiate_node(cfg, "policy")
    module = instantiate_node(cfg, "algorithm", policy=policy, benchmark=benchmark,
                              sampler=instantiate_node(cfg, "sampler"))
    assert module.rollout_micro_batch_size == 9
    expected = {"mmada_ht": "prompt_conditioned", "dimoo_ht": "prompt_conditioned"}.get(experiment, experiment.split("_")[1])
    assert cfg.algorithm.estimator.name == expected


def test_generic_policy_code_does_not_import_shapesworld():
    """The model-agnostic modules never import ShapesWorld (its builders live in policies/shapes_llada.py)."""
    import ast

    generic = ["masked_diffusion.py", "generators.py", "sampling.py", "t2i_layout.py", "pretrained.py",
               "text_tokenizers.py", "llada.py"]
    for name in generic:
        tree = ast.parse((REPO_ROOT / "htgrpo" / "policies" / name).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        shapes = [m for m in imported if "shapes" in m or m == "htgrpo.policies.tokenizers"]
        # generators.py resolves the moved names lazily through `from htgrpo.policies import shapes_llada`
        shapes += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "htgrpo.policies"
                   for a in n.names if name != "generators.py" and "shapes" in a.name]
        assert not shapes, f"{name} imports {shapes}"


def test_long_prompts_are_truncated_keeping_the_template_closed(dimoo, mmada):
    long = "a photo of " + " and ".join(["a purple giraffe next to an orange umbrella"] * 20)
    ids, mask = dimoo.text_tokenizer.encode([long], max_length=dimoo.layout.max_text_len)
    tokens = dimoo.text_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert int(mask.sum()) == dimoo.layout.max_text_len and tokens[0] == "<system>" and tokens[-1] == "</user>"
    seq, _ = dimoo.sequences(torch.full((1, dimoo.num_image_tokens), MASKED), dimoo.encode_prompts([long]))
    assert seq.shape[1] == dimoo.layout.seq_len
    # MMaDA keeps the start of the prompt and always closes it with <eos> before <|soi|>
    seq, _ = mmada.sequences(torch.full((1, mmada.num_image_tokens), MASKED), mmada.encode_prompts([long]))
    tokens = mmada.text_tokenizer.convert_ids_to_tokens(seq[0].tolist())
    n = mmada.num_image_tokens
    assert tokens[:2] == ["<|t2i|>", "<|startoftext|>"] and tokens[-(n + 3):-(n + 1)] == ["<|endoftext|>", "<|soi|>"]
