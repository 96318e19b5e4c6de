"""Distributed strategies: clip-and-step under manual optimisation (filled in below)."""

from __future__ import annotations

from typing import Any

import torch


def clip_and_step(module: Any, optimizer: Any, max_grad_norm: float) -> float:
    """Clip the gradients to ``max_grad_norm`` (0: no clip), step ``optimizer``; returns the norm before clipping."""
    params = [p for p in module.policy.parameters() if p.grad is not None]
    norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
            if params else torch.zeros(()))
    if max_grad_norm > 0:
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    return float(norm)
