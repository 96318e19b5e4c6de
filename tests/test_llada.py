"""LLaDA backbone: checkpoint format, attention semantics, restricted logits, loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from htgrpo.policies.llada import CheckpointNotFoundError, LLaDAConfig, LLaDAModelLM, load_llada

LLADA_BLOCK_PARAMS = ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def tiny_config(**overrides) -> LLaDAConfig:
    kw = dict(
        d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=50, embedding_size=64,
        max_sequence_length=64, mask_token_id=49,
    )
    kw.update(overrides)
    return LLaDAConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> LLaDAModelLM:
    torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so the checks cover them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_state_dict_names_are_llada_names():
    model = tiny_model()
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{n}.weight" for i in range(2) for n in LLADA_BLOCK_PARAMS}
    assert set(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["model.transformer.wte.weight"].shape == (64, 32)
    assert sd["model.transformer.ff_out.weight"].shape == (64, 32)  # untied head over embedding_size rows
    assert sd["model.transformer.blocks.0.ff_proj.weight"].shape == (48, 32)
    assert sd["model.transformer.blocks.0.ff_out.weight"].shape == (32, 48)


def test_save_load_roundtrip_gives_identical_logits(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 12))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_llada(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_left_padding_does_not_change_logits():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 10))
    pads = torch.randint(0, 50, (1, 4))  # garbage ids: they must be invisible
    padded = torch.cat([pads, ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask).logits[:, 4:]
        assert torch.allclose(ref, out, atol=1e-5)
        # an all-ones mask equals no mask
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, ref)


def test_attention_is_bidirectional():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, 0], b[0, 0])  # a later token changes the first position's logits


@pytest.mark.parametrize("kv", [{"n_kv_heads": 2}, {"n_kv_heads": None, "multi_query_attention": True}])
def test_grouped_query_attention_equals_expanded_multi_head(kv):
    gqa = tiny_model(**kv)
    n_kv = gqa.config.effective_n_kv_heads
    assert n_kv < gqa.config.n_heads
    mha = LLaDAModelLM(tiny_config(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    head_dim, group = 32 // 4, 4 // n_kv
    for key, value in list(sd.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # query head h reads kv head h // group
            sd[key] = value.view(n_kv, head_dim, -1).repeat_interleave(group, 0).reshape(4 * head_dim, -1)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(gqa(ids).logits, mha(ids).logits, atol=1e-5)


def test_project_and_final_hidden_match_full_logits():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 12))
    cols = slice(20, 31)
    with torch.no_grad():
        full = model(ids).logits
        h = model.final_hidden(ids, positions=slice(3, 9))
        assert torch.allclose(model.project(h, cols), full[:, 3:9, cols], atol=1e-6)
        assert torch.allclose(model.project(h), full[:, 3:9], atol=1e-6)
        per_row = torch.tensor([[0, 5], [11, 2]])
        h2 = model.final_hidden(ids, positions=per_row)
        assert torch.allclose(model.project(h2, cols)[1, 0], full[1, 11, cols], atol=1e-6)


def test_mmada_config_with_extra_keys_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(
        model_type="mmada", architectures=["MMadaModelLM"], codebook_size=8192, num_vq_tokens=1024,
        new_vocab_size=134656, llm_vocab_size=126464, init_device="meta", alibi=False, rope=True,
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig"}, some_future_key={"x": 1},
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_llada(tmp_path).eval()
    assert loaded.config.codebook_size == 8192 and loaded.config.d_model == 32
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unsupported_architecture_switch_is_an_error():
    with pytest.raises(ValueError, match="alibi"):
        LLaDAModelLM(tiny_config(alibi=True))


def test_missing_checkpoint_gives_actionable_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="hf download") as err:
        load_llada(tmp_path / "no_such_checkpoint", config_key="policy.backbone_path")
    assert "policy.backbone_path=" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_llada(tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError, match="Gen-Verse/MMaDA-8B-Base"):  # offline (conftest)
        load_llada("Gen-Verse/MMaDA-8B-Base")
