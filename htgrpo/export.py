"""``python -m htgrpo.export ckpt_path=RUN/checkpoints/last.ckpt out=DIR [merge=true]`` — a fit checkpoint as a folder.

1. Rebuild the policy exactly as the fit run did, from the run's composed config (``RUN/.hydra/config.yaml``, found
   next to ``ckpt_path``, or ``run_config=FILE``): with LoRA this is the base model with fresh adapters.
2. Load the checkpoint's ``policy.*`` weights into it (a LoRA checkpoint holds only the adapters; the frozen base
   weights come from the base checkpoint the run was built from). ``ckpt_path`` is any checkpoint ``fit`` writes:
   a Lightning ``.ckpt`` (LoRA or full), an FSDP sharded folder or a DeepSpeed folder; steps 1-2 are
   ``htgrpo.checkpoints.load_fit_checkpoint``.
3. Write ``out``:
   - ``merge=false`` (LoRA): peft's adapter folder, ``adapter_config.json`` + ``adapter_model.safetensors``; load it
     with ``PeftModel.from_pretrained(LLaDAModelLM.from_pretrained(BASE), out)``, or evaluate it with
     ``python -m htgrpo.evaluate policy=<the base policy> ckpt_path=out``;
   - ``merge=true`` (or a full fine-tuning checkpoint): the adapters folded into the weights and the whole policy
     saved with ``save_pretrained`` (``config.json`` + ``model.safetensors`` + layout and tokenizer files); load it
     with ``LLaDAModelLM.from_pretrained(out)`` or ``python -m htgrpo.evaluate ckpt_path=out``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from htgrpo._hydra import config_dir, run_or_exit_on_config_error
from htgrpo.checkpoints import load_fit_checkpoint  # every fit checkpoint kind (htgrpo.checkpoints)
from htgrpo.config import ConfigError

log = logging.getLogger("htgrpo.export")


def export(ckpt_path: str | Path, out: str | Path, merge: bool = False,
           run_config: str | Path | None = None) -> list[str]:
    """Write the folder (see the module docstring); returns the names of the files written."""
    from htgrpo.policies.lora import is_lora, merge_lora, save_adapter

    policy = load_fit_checkpoint(ckpt_path, run_config)
    out = Path(str(out)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if is_lora(policy) and not merge:
        save_adapter(policy, out)
        kind = "adapter"
    else:
        if not is_lora(policy) and not merge:
            log.info("full fine-tuning checkpoint: writing the full policy folder (there is no adapter)")
        merge_lora(policy).save_pretrained(out)
        kind = "merged" if merge else "full"
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {kind} policy -> {out}: {', '.join(files)}")
    return files


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_exit_on_config_error(run, cfg, log)


def run(cfg: DictConfig) -> None:
    """Export ``cfg.ckpt_path`` into ``cfg.out`` (both mandatory)."""
    for key in ("ckpt_path", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(key, "is mandatory: set it on the command line (ckpt_path=RUN/checkpoints/last.ckpt"
                                   " out=DIR)")
    export(cfg.ckpt_path, cfg.out, merge=bool(cfg.merge), run_config=cfg.get("run_config"))


if __name__ == "__main__":
    main()
