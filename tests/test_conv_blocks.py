"""The shared LDM autoencoder blocks (htgrpo/policies/conv_blocks.py) and the sequence-layout helpers that MMaDA's and
DiMOO's layouts share: forward numbers against an independent float64 numpy statement of the blocks, parameter
names, each model's own swish, and hand-computed layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from htgrpo.policies.conv_blocks import AttnBlock, Downsample, MidBlock, ResnetBlock, Upsample
from htgrpo.policies.mar.vae import swish, swish_resnet_block
from htgrpo.policies.t2i_layout import codes_to_ids, left_pad


# ---- an independent float64 numpy statement of the LDM blocks (taming-transformers' model.py, as facts) ---------
def _np_group_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int = 32, eps: float = 1e-6):
    """(B, C, H, W): per sample and group of C/groups channels, (x - mean) / sqrt(var + eps) (biased variance),
    then the per-channel affine."""
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(b, c, h, w) * weight[None, :, None, None] + bias[None, :, None, None]


def _np_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """Cross-correlation out[b, o, i, j] = bias[o] + sum_{c, u, v} w[o, c, u, v] · xpad[b, c, i·s + u, j·s + v]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("bchwuv,ocuv->bohw", windows, weight) + bias[None, :, None, None]


def _np_swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _np(module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def _np_resnet(x, p, prefix=""):
    h = _np_conv(_np_swish(_np_group_norm(x, p[prefix + "norm1.weight"], p[prefix + "norm1.bias"])),
                 p[prefix + "conv1.weight"], p[prefix + "conv1.bias"], pad=1)
    h = _np_conv(_np_swish(_np_group_norm(h, p[prefix + "norm2.weight"], p[prefix + "norm2.bias"])),
                 p[prefix + "conv2.weight"], p[prefix + "conv2.bias"], pad=1)
    if prefix + "nin_shortcut.weight" in p:
        x = _np_conv(x, p[prefix + "nin_shortcut.weight"], p[prefix + "nin_shortcut.bias"])
    return x + h


def _np_attention(x, p, prefix=""):
    """taming's AttnBlock: q, k, v 1x1 convs of the normalised input; w = softmax_j(q_i · k_j / sqrt(C)) over the
    h·w positions; out = x + proj_out(sum_j w_ij v_j)."""
    b, c, hh, ww = x.shape
    n = _np_group_norm(x, p[prefix + "norm.weight"], p[prefix + "norm.bias"])
    q, k, v = (_np_conv(n, p[prefix + f"{m}.weight"], p[prefix + f"{m}.bias"]).reshape(b, c, -1) for m in "qkv")
    logits = np.einsum("bci,bcj->bij", q, k) / np.sqrt(c)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww)
    return x + _np_conv(out, p[prefix + "proj_out.weight"], p[prefix + "proj_out.bias"])


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (GroupNorm affine too, so a swapped weight/bias shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.2))
    return module.eval()


def test_block_forwards_match_an_independent_float64_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 5, 6, generator=g)
    xn = x.double().numpy()
    widen = _randomised(ResnetBlock(32, 64, activation=swish), 1)
    same = _randomised(ResnetBlock(32, 32), 2)  # F.silu: equal to x·sigmoid(x) up to float rounding
    attn = _randomised(AttnBlock(32), 3)
    mid = _randomised(MidBlock(32, activation=swish), 4)
    down, up = _randomised(Downsample(32), 5), _randomised(Upsample(32), 6)
    with torch.no_grad():
        got = {"widen": widen(x), "same": same(x), "attn": attn(x), "mid": mid(x), "down": down(x), "up": up(x)}
    mp = _np(mid)
    want = {
        "widen": _np_resnet(xn, _np(widen)),
        "same": _np_resnet(xn, _np(same)),
        "attn": _np_attention(xn, _np(attn)),
        "mid": _np_resnet(_np_attention(_np_resnet(xn, mp, "block_1."), mp, "attn_1."), mp, "block_2."),
        # LDM's asymmetric downsampling: one zero row / column at the bottom / right, 3x3 stride-2, no padding
        "down": _np_conv(np.pad(xn, ((0, 0), (0, 0), (0, 1), (0, 1))), *_np(down).values(), stride=2),
        # nearest x2 (each pixel repeated in a 2x2 square), then a padded 3x3 conv
        "up": _np_conv(xn.repeat(2, axis=2).repeat(2, axis=3), *_np(up).values(), pad=1),
    }
    assert got["widen"].shape == (2, 64, 5, 6) and got["down"].shape == (2, 32, 2, 3) and got["up"].shape == (2, 32, 10, 12)
    for name in want:
        np.testing.assert_allclose(got[name].double().numpy(), want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_blocks_keep_the_released_parameter_names():
    assert list(ResnetBlock(32, 64).state_dict()) == [
        "norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias",
        "conv2.weight", "conv2.bias", "nin_shortcut.weight", "nin_shortcut.bias"]
    assert "nin_shortcut.weight" not in ResnetBlock(32, 32).state_dict()
    assert [k.split(".")[0] for k in AttnBlock(32).state_dict()][::2] == ["norm", "q", "k", "v", "proj_out"]
    assert {k.split(".")[0] for k in MidBlock(32).state_dict()} == {"block_1", "attn_1", "block_2"}


def test_each_model_keeps_its_own_swish():
    # MAGVIT-v2's code uses F.silu, the KL-16 VAE's x·sigmoid(x): equal in exact arithmetic, not bit for bit
    assert ResnetBlock(32, 32).activation is F.silu
    assert swish_resnet_block(32, 32).activation is swish
    assert MidBlock(32, activation=swish).block_2.activation is swish
    x = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(swish(x), torch.tensor([-2.0 / (1 + torch.e**2), 0.0, 3.0 / (1 + torch.e**-3)]))


def test_left_pad_and_codes_to_ids_by_hand():
    ids, mask = left_pad([torch.tensor([7, 8]), torch.tensor([9, 10, 11]), torch.tensor([], dtype=torch.long)],
                         4, pad=0, like=torch.zeros(1))
    assert ids.tolist() == [[0, 0, 7, 8], [0, 9, 10, 11], [0, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    # codes + offset 100; -1 (masked) -> the mask id 5
    assert codes_to_ids(torch.tensor([[0, -1, 3]]), 3, offset=100, mask_id=5).tolist() == [[100, 5, 103]]
    with pytest.raises(ValueError, match="expected 3 image tokens, got 2"):
        codes_to_ids(torch.tensor([[0, 1]]), 3, offset=100, mask_id=5)
