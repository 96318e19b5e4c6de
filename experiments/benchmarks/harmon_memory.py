"""Memory of MAR-GRPO on Harmon-1.5B: parameters, gradients, AdamW state and the frozen reference, per module.

    python experiments/benchmarks/harmon_memory.py

Builds the full-size Harmon-1.5B architecture (Qwen2.5-1.5B-Instruct config, mar_huge with DiffLoss 12×1536, KL-16)
on PyTorch's ``meta`` device — no weights, no memory, no download — and counts what the training state holds with
``experiment=harmon_mar_grpo`` (frozen LLM, projectors, VAE and head; trained: the MAR encoder/decoder and embeddings).
Activation memory depends on batch, precision and checkpointing and is not computed here; measure it on a GPU with
``torch.cuda.max_memory_allocated`` around one training step.
"""

from __future__ import annotations

import torch


def build_full_size_harmon():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from htgrpo.policies.mar.backbone import MAR, MARConfig
    from htgrpo.policies.mar.harmon import HarmonPolicy
    from htgrpo.policies.mar.vae import KLAutoencoder

    llm_config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1_000_000.0, tie_word_embeddings=True)
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(llm_config)
        mar = MAR(MARConfig.preset("mar_huge", seq_h=16, seq_w=16, token_embed_dim=16, buffer_size=64,
                                   conditioning="class", num_classes=1000, diffloss_d=12, diffloss_w=1536))
        vae = KLAutoencoder()
        return HarmonPolicy(llm, mar, vae, tokenizer=None, image_size=512)


def count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable is not None and p.requires_grad != trainable):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def main() -> None:
    policy = build_full_size_harmon()
    for module in (policy.llm, policy.proj_in, policy.proj_out, policy.vae, policy.mar.diffloss):
        module.requires_grad_(False)          # experiment=harmon_mar_grpo: freeze_llm, frozen VAE, freeze_head
    gib = 1024 ** 3
    rows = [("llm (Qwen2.5-1.5B, tied embeddings)", policy.llm), ("mar encoder/decoder + embeddings", None),
            ("mar.diffloss (head)", policy.mar.diffloss), ("proj_in + proj_out", None), ("vae (KL-16)", policy.vae)]
    mar_body = count(policy.mar) - count(policy.mar.diffloss)
    projectors = count(policy.proj_in) + count(policy.proj_out)
    print("| module | parameters | fp32 GiB | bf16 GiB |")
    print("|---|---|---|---|")
    for name, module in rows:
        n = mar_body if name.startswith("mar encoder") else projectors if name.startswith("proj") else count(module)
        print(f"| {name} | {n / 1e6:.1f} M | {4 * n / gib:.2f} | {2 * n / gib:.2f} |")
    total, trainable = count(policy), count(policy, trainable=True)
    print(f"| **total** | {total / 1e6:.1f} M | {4 * total / gib:.2f} | {2 * total / gib:.2f} |")
    print()
    # Training state: policy + frozen deep-copied reference (beta > 0) + grads and AdamW moments of the trained part.
    weights = 2 * total * 4                                 # policy + reference copy, fp32 (bf16-mixed keeps fp32)
    grads = trainable * 4
    adam = 2 * trainable * 4                                # exp_avg, exp_avg_sq
    print(f"fp32 weights (trainer.precision=bf16-mixed or 32-true): policy + reference {weights / gib:.1f} GiB, "
          f"grads {grads / gib:.1f} GiB, AdamW {adam / gib:.1f} GiB -> {(weights + grads + adam) / gib:.1f} GiB "
          f"before activations (trained parameters: {trainable / 1e6:.1f} M)")

if __name__ == "__main__":
    main()
