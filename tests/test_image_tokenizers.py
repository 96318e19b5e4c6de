"""Real image tokenizers: MAGVIT-v2 (MMaDA, released Show-o layout) and diffusers VQModel (Lumina-DiMOO, ``vqvae/``).

Tiny random checkpoints are written in the released formats by ``htgrpo.policies.image_tokenizers.tiny`` and loaded
back through ``from_pretrained``, the path users hit. No downloads (HF_HUB_OFFLINE=1 from conftest).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from htgrpo.policies.image_tokenizers import (
    DiffusersVQImageTokenizer,
    ImageTokenizer,
    MagvitImageTokenizer,
    MissingWeightsError,
    grid_for_size,
    resize_center_crop,
    write_tiny_dimoo_vq,
    write_tiny_magvit,
)
from htgrpo.policies.image_tokenizers.magvit2 import MAGVITv2, LFQuantizer, bits_to_codes, codes_to_bits
from htgrpo.policies.llada import CheckpointNotFoundError


@pytest.fixture(scope="module")
def magvit_dir(tmp_path_factory):
    return write_tiny_magvit(tmp_path_factory.mktemp("magvit") / "magvitv2")


@pytest.fixture(scope="module")
def dimoo_root(tmp_path_factory):
    return write_tiny_dimoo_vq(tmp_path_factory.mktemp("dimoo") / "Lumina-DiMOO")


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Grid arithmetic and preprocessing
# ----------------------------------------------------------------------------------------------------------------


def test_grid_for_size_examples_and_errors():
    assert grid_for_size(512, 512, 16) == (32, 32)
    assert grid_for_size(1024, 1024, 16) == (64, 64)
    assert grid_for_size(768, 1536, 16) == (48, 96)
    with pytest.raises(ValueError, match="500x512"):
        grid_for_size(500, 512, 16)
    with pytest.raises(ValueError, match="0x16"):
        grid_for_size(0, 16, 16)


def test_resize_center_crop_keeps_the_centre():
    # 64 x 128 (H x W) image: columns 32..95 are 200, the rest 0. Target 64 x 64: scale = max(64/64, 64/128) = 1,
    # so no resize, and the centre crop takes exactly columns 32..95.
    img = torch.zeros(3, 64, 128, dtype=torch.uint8)
    img[:, :, 32:96] = 200
    out = resize_center_crop(img, 64)
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.uint8
    assert bool((out == 200).all())
    # A constant 100 x 50 image resized to 32 x 48 stays constant (bicubic of a constant is the constant).
    const = torch.full((1, 3, 100, 50), 77, dtype=torch.uint8)
    out = resize_center_crop(const, (32, 48))
    assert out.shape == (1, 3, 32, 48) and bool((out == 77).all())


# ----------------------------------------------------------------------------------------------------------------
# Lookup-free quantiser
# ----------------------------------------------------------------------------------------------------------------


def test_lfq_code_bit_round_trip_and_codebook():
    q = LFQuantizer(codebook_dim=13)
    assert q.codebook_size == 2**13 == 8192
    codes = torch.arange(8192)
    bits = codes_to_bits(codes, 13)
    assert bits.shape == (8192, 13)
    assert torch.equal(bits_to_codes(bits), codes)
    # Most significant bit first (the release's power_vals = [4096, 2048, ..., 1]).
    assert codes_to_bits(torch.tensor(1), 13).tolist() == [0] * 12 + [1]
    assert codes_to_bits(torch.tensor(4096), 13).tolist() == [1] + [0] * 12
    assert codes_to_bits(torch.tensor(5), 13).tolist() == [0] * 10 + [1, 0, 1]
    assert q.power_vals.tolist() == [2**k for k in range(12, -1, -1)]
    # embedding row c = 2 * bits(c) - 1, so every code is a distinct corner of {-1, +1}^13.
    assert torch.equal(q.embedding, bits.float() * 2 - 1)
    # Quantising a code's own embedding gives the code back, for a 2 x 3 grid (row-major).
    grid_codes = torch.tensor([[0, 1, 5, 4096, 8190, 8191]])
    z = q.codes_to_latents(grid_codes, (2, 3))
    assert z.shape == (1, 13, 2, 3)
    assert torch.equal(q.latents_to_codes(z), grid_codes)
    # Sign quantisation of arbitrary latents: positive -> 1, non-positive -> 0; latent (+,-,...,-,+) -> 4096 + 1.
    lat = -torch.ones(1, 13, 1, 1)
    lat[0, 0] = 0.3
    lat[0, 12] = 2.0
    assert q.latents_to_codes(lat).tolist() == [[4097]]
    with pytest.raises(ValueError, match="masked"):
        q.codes_to_latents(torch.tensor([[8192]]), (1, 1))


# ----------------------------------------------------------------------------------------------------------------
# MAGVIT-v2
# ----------------------------------------------------------------------------------------------------------------

# Facts read from the released module tree (Show-o / MMaDA ``MAGVITv2()`` with its default config): 382 tensors,
# 95,387,004 parameters plus the two quantiser buffers. A representative set of names and shapes:
RELEASED_MAGVIT_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.3.conv2.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.down.4.block.3.conv1.bias": (512,),
    "encoder.mid.block_1.norm2.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (13, 512, 3, 3),
    "encoder.quant_conv.weight": (13, 13, 1, 1),
    "decoder.post_quant_conv.weight": (13, 13, 1, 1),
    "decoder.conv_in.weight": (512, 13, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
    "decoder.up.0.block.3.norm2.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quantize.embedding": (8192, 13),
    "quantize.power_vals": (13,),
}


def test_full_size_magvit_matches_released_state_dict_layout():
    with torch.device("meta"):  # shapes only, no 380 MB allocation
        model = MAGVITv2()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 382
    assert sum(p.numel() for p in model.parameters()) == 95_387_004
    for key, shape in RELEASED_MAGVIT_KEYS.items():
        assert shapes.get(key) == shape, key
    # No attention inside the down/up stages (attn_resolutions=[5] is never reached), no temb projection.
    assert not any(".attn.0." in k or "temb_proj" in k for k in shapes)
    # The released config.json has only private keys (the constructor takes no arguments).
    assert set(model.config_dict()) == {"_class_name", "_version"}
    assert model.downsample == 16


def test_tiny_magvit_uses_the_released_key_pattern(magvit_dir):
    state = torch.load(magvit_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    for key, shape in RELEASED_MAGVIT_KEYS.items():
        if key.startswith(("encoder.down.1.block.0.nin", "decoder.up.3.block.0.nin")):
            continue  # tiny widths are equal at every level, so no width-changing shortcut exists
        if ".block.3." in key or ".block.2." in key:
            continue  # tiny has one ResnetBlock per level
        assert key in state, key
    assert state["quantize.embedding"].shape == (8192, 13)
    assert state["encoder.conv_out.weight"].shape[0] == 13
    cfg = json.loads((magvit_dir / "config.json").read_text())
    assert cfg["_class_name"] == "MAGVITv2"
    assert cfg["encoder"]["ch"] == 32 and cfg["decoder"]["ch_mult"] == [1, 1, 1, 1, 1]
    size = sum(p.stat().st_size for p in magvit_dir.iterdir())
    assert size < 2_000_000


def _reference():
    """tests/fixtures/image_tokenizers: the independent MAGVIT-v2 restatement / diffusers reference and its codes and
    pixels for the tiny seed-0 checkpoints (see the README there)."""
    from conftest import REPO_ROOT, load_script

    folder = REPO_ROOT / "tests" / "fixtures" / "image_tokenizers"
    script = load_script("htgrpo_tokenizer_reference", folder / "make_reference.py")
    return script, dict(np.load(folder / "reference.npz"))


def _assert_pixels_close(got: torch.Tensor, want: np.ndarray) -> None:
    """uint8 images equal up to one level on a few pixels (float rounding before the truncation to uint8)."""
    diff = (got.int() - torch.from_numpy(want).int()).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99


def test_tiny_magvit_codes_and_pixels_match_the_reference_fixture(magvit_dir):
    script, ref = _reference()
    state = torch.load(magvit_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert script.state_fingerprint(state) == str(ref["magvit_weights_sha256"]), (
        "the tiny MAGVIT-v2 weights changed (write_tiny_magvit or torch's RNG): regenerate the fixture with "
        "python tests/fixtures/image_tokenizers/make_reference.py")
    tok = MagvitImageTokenizer.from_pretrained(magvit_dir)
    images = torch.from_numpy(ref["images"])
    codes = tok.encode(images)
    assert codes.tolist() == ref["magvit_codes"].tolist()
    assert len(set(codes.flatten().tolist())) > 4  # the grid's codes vary
    _assert_pixels_close(tok.decode(torch.from_numpy(ref["magvit_codes"]), (2, 3)), ref["magvit_pixels"])


def test_released_magvit_architecture_matches_the_show_o_restatement():
    """The full-size released module tree (random weights, 4/3 ResnetBlocks per level, width changes through
    ``nin_shortcut``) against the independent restatement of Show-o's forward, on 32 x 32 images."""
    script, ref = _reference()
    torch.manual_seed(0)
    model = MAGVITv2().eval()
    tok = MagvitImageTokenizer(model)
    images = torch.from_numpy(ref["images"][:, :, :32, :32].copy())
    state = model.state_dict()
    with torch.no_grad():
        codes = tok.encode(images)
        assert codes.tolist() == script.magvit2_encode(state, images).tolist()
        _assert_pixels_close(tok.decode(codes, (2, 2)), script.magvit2_decode(state, codes, (2, 2)).numpy())


def test_magvit_round_trip_and_save_load_identity(magvit_dir, tmp_path):
    tok = MagvitImageTokenizer.from_pretrained(magvit_dir)
    assert isinstance(tok, ImageTokenizer)
    assert (tok.codebook_size, tok.downsample) == (8192, 16)
    assert tok.grid_for(512, 512) == (32, 32)
    x = _images(2, 64, 96)
    codes = tok.encode(x)
    assert codes.shape == (2, 4 * 6) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 8192
    # Float input in [0, 1] is the same image.
    assert torch.equal(tok.encode(x.float() / 255.0), codes)
    out = tok.decode(codes, (4, 6))
    assert out.shape == (2, 3, 64, 96) and out.dtype == torch.uint8
    # decode maps the model's [-1, 1] output with floor(clamp((y + 1) / 2, 0, 1) * 255), as MMaDA does.
    raw = tok.model.decode_code(codes, shape=(4, 6))
    assert torch.equal(out, ((raw + 1) / 2).clamp(0, 1).mul(255).floor().to(torch.uint8))
    # Saved and re-loaded (released .bin layout and the safetensors variant) -> identical codes and images.
    for safe in (False, True):
        folder = tok.save_pretrained(tmp_path / f"saved_{safe}", safe_serialization=safe)
        again = MagvitImageTokenizer.from_pretrained(folder)
        assert torch.equal(again.encode(x), codes)
        assert torch.equal(again.decode(codes, (4, 6)), out)
    with pytest.raises(ValueError, match="40x64"):
        tok.encode(_images(1, 40, 64))


def test_magvit_loads_with_dtype_and_rejects_mismatched_weights(magvit_dir, tmp_path):
    tok = MagvitImageTokenizer.from_pretrained(magvit_dir, dtype=torch.bfloat16, device="cpu")
    assert tok.dtype == torch.bfloat16
    codes = tok.encode(_images(1, 32, 32))
    assert codes.dtype == torch.long and codes.shape == (1, 4)
    # A config that does not describe the stored weights fails with the key and the mismatching tensors.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes((magvit_dir / "pytorch_model.bin").read_bytes())
    cfg = json.loads((magvit_dir / "config.json").read_text())
    cfg["encoder"]["ch"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"policy\.vq_model=.*wrong shape"):
        MagvitImageTokenizer.from_pretrained(bad)
    cfg["nonsense"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="nonsense"):
        MagvitImageTokenizer.from_pretrained(bad)


# ----------------------------------------------------------------------------------------------------------------
# Lumina-DiMOO: diffusers VQModel under vqvae/
# ----------------------------------------------------------------------------------------------------------------


def test_dimoo_vq_non_square_round_trip_matches_released_pipeline(dimoo_root):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    assert (dimoo_root / "vqvae" / "config.json").is_file()
    assert (dimoo_root / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    tok = DiffusersVQImageTokenizer.from_pretrained(dimoo_root)
    assert isinstance(tok, ImageTokenizer)
    assert (tok.codebook_size, tok.downsample) == (8192, 16)
    x = _images(2, 32, 64, seed=3)
    assert tok.grid_for(32, 64) == (2, 4)
    codes = tok.encode(x)
    assert codes.shape == (2, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 8192
    out = tok.decode(codes, (2, 4))
    assert out.shape == (2, 3, 32, 64) and out.dtype == torch.uint8

    # The released DiMOO path, image by image: VaeImageProcessor(do_normalize=False) on a PIL image,
    # vq.encode(x).latents, vq.quantize(latents)[2][2]; decode(force_not_quantize, shape).sample.clip(0, 1),
    # then postprocess to PIL.
    proc = VaeImageProcessor(vae_scale_factor=16, do_normalize=False)
    vq = tok.vq
    for i in range(2):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        pixels = proc.preprocess(pil)
        with torch.no_grad():
            latents = vq.encode(pixels).latents
            ref_codes = vq.quantize(latents)[2][2].reshape(1, -1)
            assert torch.equal(ref_codes, codes[i : i + 1])
            recon = vq.decode(ref_codes, force_not_quantize=True, shape=(1, 2, 4, vq.config.latent_channels))
            ref_img = proc.postprocess(recon.sample.clip(0, 1), output_type="pil")[0]
        assert torch.equal(torch.from_numpy(np.array(ref_img)).permute(2, 0, 1), out[i])

    # Pointing at the vqvae folder itself works too.
    assert torch.equal(DiffusersVQImageTokenizer.from_pretrained(dimoo_root / "vqvae").encode(x), codes)
    # Saved and re-loaded gives identical codes.
    again = DiffusersVQImageTokenizer.from_pretrained(tok.save_pretrained(dimoo_root.parent / "copy" / "vqvae").parent)
    assert torch.equal(again.encode(x), codes)
    size = sum(p.stat().st_size for p in (dimoo_root / "vqvae").iterdir())
    assert size < 2_000_000


def test_tiny_dimoo_vq_codes_and_pixels_match_the_reference_fixture(dimoo_root):
    from safetensors.torch import load_file

    script, ref = _reference()
    state = load_file(str(dimoo_root / "vqvae" / "diffusion_pytorch_model.safetensors"))
    assert script.state_fingerprint(state) == str(ref["dimoo_weights_sha256"]), (
        "the tiny DiMOO VQ weights changed (write_tiny_dimoo_vq or torch's RNG): regenerate the fixture with "
        "python tests/fixtures/image_tokenizers/make_reference.py")
    tok = DiffusersVQImageTokenizer.from_pretrained(dimoo_root)
    codes = tok.encode(torch.from_numpy(ref["images"]))
    assert codes.tolist() == ref["dimoo_codes"].tolist()
    _assert_pixels_close(tok.decode(torch.from_numpy(ref["dimoo_codes"]), (2, 3)), ref["dimoo_pixels"])


# ----------------------------------------------------------------------------------------------------------------
# Missing weights
# ----------------------------------------------------------------------------------------------------------------


def test_missing_weights_give_one_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached

    with pytest.raises(MissingWeightsError) as err:
        MagvitImageTokenizer.from_pretrained("showlab/magvitv2")
    msg = str(err.value)
    assert isinstance(err.value, CheckpointNotFoundError)
    assert "policy.vq_model" in msg and "showlab/magvitv2" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download showlab/magvitv2 --local-dir" in msg and "policy.vq_model=/path/to/magvitv2" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback noise
    assert (err.value.config_key, err.value.repo_id) == ("policy.vq_model", "showlab/magvitv2")

    with pytest.raises(MissingWeightsError, match=r"policy\.vq_model=.*does not exist.*showlab/magvitv2"):
        MagvitImageTokenizer.from_pretrained(tmp_path / "absent")

    # A DiMOO folder without its vqvae subfolder: names the key the caller passes, the repo and the subfolder.
    (tmp_path / "dimoo").mkdir()
    with pytest.raises(MissingWeightsError) as err:
        DiffusersVQImageTokenizer.from_pretrained(tmp_path / "dimoo", config_key="policy.pretrained")
    msg = str(err.value)
    assert "policy.pretrained" in msg and "Alpha-VLLM/Lumina-DiMOO" in msg and "'vqvae'" in msg
    assert 'hf download Alpha-VLLM/Lumina-DiMOO --include "vqvae/*"' in msg
    with pytest.raises(MissingWeightsError, match="Alpha-VLLM/Lumina-DiMOO.*HF_HUB_OFFLINE"):
        DiffusersVQImageTokenizer.from_pretrained("Alpha-VLLM/Lumina-DiMOO")


def test_released_amused_vq_config_gives_dimoo_grid():
    """The aMUSEd VQ config (diffusers ``scripts/convert_amused.py``), which DiMOO's ``vqvae`` uses: x16, 8192 codes."""
    from diffusers import VQModel

    with torch.device("meta"):
        vq = VQModel(
            act_fn="silu",
            block_out_channels=[128, 256, 256, 512, 768],
            down_block_types=["DownEncoderBlock2D"] * 5,
            up_block_types=["UpDecoderBlock2D"] * 5,
            in_channels=3,
            out_channels=3,
            latent_channels=64,
            layers_per_block=2,
            norm_num_groups=32,
            num_vq_embeddings=8192,
            sample_size=32,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
        )
    tok = DiffusersVQImageTokenizer(vq)
    assert (tok.codebook_size, tok.downsample) == (8192, 16)
    assert tok.grid_for(1024, 1024) == (64, 64)
    assert tok.grid_for(768, 1536) == (48, 96)
    with pytest.raises(ValueError, match="lookup_from_codebook"):
        with torch.device("meta"):
            DiffusersVQImageTokenizer(VQModel(block_out_channels=[32], lookup_from_codebook=False))


@pytest.mark.slow
def test_full_size_magvit_maps_512px_to_a_32x32_grid():
    """Released architecture (random weights): 512 x 512 -> 1024 codes -> 512 x 512 uint8 (minutes on CPU), equal to
    the independent restatement of Show-o's forward (tests/fixtures/image_tokenizers/make_reference.py)."""
    script, _ = _reference()
    torch.manual_seed(0)
    model = MAGVITv2().eval()
    tok = MagvitImageTokenizer(model)
    images = _images(1, 512, 512)
    codes = tok.encode(images)
    assert codes.shape == (1, 32 * 32)
    out = tok.decode(codes, (32, 32))
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.uint8
    with torch.no_grad():
        want = script.magvit2_encode(model.state_dict(), images)
        # sign quantisation: a latent within float rounding of 0 may flip one bit between two implementations
        assert float((codes == want).float().mean()) > 0.99
        _assert_pixels_close(out, script.magvit2_decode(model.state_dict(), codes, (32, 32)).numpy())


def test_tiny_tokenizers_with_small_codebooks(tmp_path):
    """Tiny language models may ask for fewer codes; the saved config carries it and loading honours it."""
    mag = MagvitImageTokenizer.from_pretrained(write_tiny_magvit(tmp_path / "m", codebook_dim=6))
    assert (mag.codebook_size, mag.downsample) == (64, 16)
    codes = mag.encode(_images(1, 32, 48))
    assert codes.shape == (1, 6) and int(codes.max()) < 64
    assert mag.decode(codes, (2, 3)).shape == (1, 3, 32, 48)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["codebook_dim"] == 6
    vq = DiffusersVQImageTokenizer.from_pretrained(write_tiny_dimoo_vq(tmp_path / "d", num_vq_embeddings=64))
    assert (vq.codebook_size, vq.downsample) == (64, 16)
    codes = vq.encode(_images(1, 16, 32))
    assert codes.shape == (1, 2) and int(codes.max()) < 64
    assert vq.decode(codes, (1, 2)).shape == (1, 3, 16, 32)
