"""Parameter and training-state memory of HT-GRPO on MMaDA-8B / Lumina-DiMOO (LLaDA-8B architecture), counted.

    python experiments/benchmarks/llada8b_memory.py [--lora-r 128] [--vocab 134656]

Builds the full-size LLaDA-8B backbone on the ``meta`` device (no memory, no weights), counts parameters per module
and the LoRA parameters peft adds for ``--lora-r`` on the block Linear layers, and prints the memory of weights,
gradients and AdamW state for full fine-tuning and for LoRA. Activations are not included (they depend on the
sequence length, micro-batch sizes and gradient checkpointing; measure them on the GPU you use).
"""

from __future__ import annotations

import argparse

import torch

from htgrpo.policies.llada import LLaDAConfig, LLaDAModelLM

GIB = 1024**3
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora-r", type=int, default=128, help="LoRA rank (MaskGRPO: 128)")
    ap.add_argument("--vocab", type=int, default=134656, help="embedding rows (MMaDA: 134656)")
    args = ap.parse_args()
    # LLaDA-8B / MMaDA-8B config.json values (reference/htgrpo_mmada_dimoo.md §3.2)
    config = LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                         vocab_size=args.vocab, embedding_size=args.vocab)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("wte.weight", "transformer.ff_out.weight")))
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".blocks." in name and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            lora += args.lora_r * (module.in_features + module.out_features)
    bf16, fp32 = 2, 4
    rows = [
        ("parameters", f"{total / 1e9:.2f} B (blocks {(total - embed) / 1e9:.2f} B, embeddings + LM head {embed / 1e9:.2f} B)"),
        (f"LoRA r={args.lora_r} parameters", f"{lora / 1e6:.0f} M"),
        ("weights, bf16", f"{total * bf16 / GIB:.1f} GiB"),
        ("full fine-tuning: + frozen bf16 reference, fp32 grads + AdamW moments",
         f"{(total * bf16 * 2 + total * fp32 * 3) / GIB:.1f} GiB (before activations; shard it: trainer=deepspeed)"),
        (f"LoRA r={args.lora_r}: bf16 base (the reference is the same weights, adapters off) + fp32 adapters, grads, AdamW",
         f"{(total * bf16 + lora * fp32 * 4) / GIB:.1f} GiB (before activations)"),
    ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
