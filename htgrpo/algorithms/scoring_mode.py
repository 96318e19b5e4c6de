"""The one mode every GRPO log-prob forward runs in: train mode with every dropout layer switched off.

HT-GRPO computes three log-probs of the same tokens: old (the policy before the step's updates), reference (the frozen
starting policy) and new (the policy being updated, with grad). The importance ratio r = exp(logp_new − logp_old)
must be exactly 1 at the first inner iteration (θ = θ_old), and the clip fractions must measure policy change only.
Dropout (peft's adapter dropout, ``policy.lora.dropout``) draws a fresh mask on every forward, so with it active in
some of the three passes r ≠ 1 as soon as the adapters are nonzero. GRPO for these models uses no dropout, so all
three passes run under :func:`deterministic_scoring`.

Why train mode and not eval mode: activation checkpointing (transformers' ``GradientCheckpointingLayer`` in the LLaDA
blocks, ``policy.gradient_checkpointing``) only runs in train mode, and the update forward needs it at scale. In the
masked-diffusion policies the train/eval flag changes nothing else once the dropout layers are in eval mode.

The backward of the update must also run inside the context: non-reentrant checkpointing recomputes the block
forward during backward, which must see the same (dropout-free) modules as the forward did.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules.dropout import _DropoutNd


def is_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout layer (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``: torch's ``_DropoutNd`` family; peft's ``lora_dropout`` entries are ``nn.Dropout``)."""
    return isinstance(module, _DropoutNd)


@contextmanager
def deterministic_scoring(model: Any) -> Iterator[None]:
    """Run ``model`` in train mode with every dropout layer in eval mode; restore each module's own mode after.

    ``model`` is an ``nn.Module`` or anything exposing ``modules()`` (the adapter-disabled reference view). Each
    module's previous ``training`` flag is restored individually, so modules a policy keeps in eval mode on purpose
    (a frozen image tokenizer) stay so.
    """
    modules = list(model.modules())
    previous = [m.training for m in modules]
    try:
        for m in modules:
            m.training = not is_dropout(m)
        yield
    finally:
        for m, was_training in zip(modules, previous):
            m.training = was_training


__all__ = ["deterministic_scoring", "is_dropout"]
