"""deterministic_scoring: the one mode of every GRPO log-prob forward (train mode, dropout off; issue 17 item 5)."""

from __future__ import annotations

import torch

from htgrpo.algorithms.scoring_mode import deterministic_scoring, is_dropout
from htgrpo.policies.lora import make_reference
from test_lora import inputs, tiny, trained_adapters


def test_dropout_is_off_inside_and_every_module_gets_its_own_mode_back():
    policy = trained_adapters(tiny({"r": 4, "dropout": 0.5}))
    policy.train()
    kept_in_eval = next(m for m in policy.modules() if isinstance(m, torch.nn.Embedding)).eval()
    before = {name: m.training for name, m in policy.named_modules()}
    dropouts = [m for m in policy.modules() if is_dropout(m)]
    assert dropouts  # peft's lora_dropout entries
    with deterministic_scoring(policy):
        assert not any(m.training for m in dropouts)
        assert all(m.training for m in policy.modules() if not is_dropout(m))  # train mode: checkpointing stays on
    assert {name: m.training for name, m in policy.named_modules()} == before  # one by one, not train(was)
    assert not kept_in_eval.training


def test_logits_are_deterministic_and_equal_eval_mode_under_lora_dropout():
    policy = trained_adapters(tiny({"r": 4, "dropout": 0.5}))
    codes, prompt = inputs(policy)
    policy.train()
    with torch.no_grad():
        noisy = [policy.image_logits(codes, prompt) for _ in range(2)]
        assert not torch.equal(noisy[0], noisy[1])  # dropout really is active in plain train mode
        with deterministic_scoring(policy):
            a, b = policy.image_logits(codes, prompt), policy.image_logits(codes, prompt)
        policy.eval()
        evaluated = policy.image_logits(codes, prompt)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, evaluated, rtol=0, atol=0)
    # the adapter-disabled reference view goes through the same context
    reference = make_reference(policy, beta=0.01)
    policy.train()
    with torch.no_grad(), deterministic_scoring(reference):
        r1, r2 = reference.image_logits(codes, prompt), reference.image_logits(codes, prompt)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)


def test_checkpointed_backward_inside_the_context_gives_the_plain_gradients():
    # Non-reentrant checkpointing recomputes the blocks in backward: inside the context the recomputation must see
    # dropout off too, so the gradients equal those of the same policy without checkpointing.
    lora = {"r": 4, "dropout": 0.5}
    plain, ckpt = trained_adapters(tiny(lora)), trained_adapters(tiny(lora, gradient_checkpointing=True))
    codes, prompt = inputs(plain)
    grads = []
    for policy in (plain, ckpt):
        policy.train()
        with deterministic_scoring(policy):
            policy.image_logits(codes, prompt).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
