"""The shared LDM autoencoder blocks (htgrpo/policies/conv_blocks.py) and the sequence-layout helpers that MMaDA's and
DiMOO's layouts share: parameter names, each model's own swish, and hand-computed layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from htgrpo.policies.conv_blocks import AttnBlock, MidBlock, ResnetBlock
from htgrpo.policies.mar.vae import swish, swish_resnet_block
from htgrpo.policies.t2i_layout import codes_to_ids, left_pad


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
