"""Small files shipped inside the package, e.g. the ShapesWorld warm-start policy.

``asset_path(name)`` is the folder of an asset; configs reach it through the OmegaConf resolver
``${htgrpo_asset:NAME}`` (registered when ``htgrpo`` is imported), e.g. ``policy.pretrained_path``.

* ``shapes_llada_warmstart/``: the LLaDA-architecture toy policy warm-started on ShapesWorld by
  ``python -m htgrpo.fit experiment=shapes_pretrain`` (the exact command and its measured score are in its
  ``README.md``); ``policy=shapes_llada_warm`` starts from it.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str, must_exist: bool = True) -> str:
    """Absolute path of the shipped asset ``name`` (a file or folder under ``htgrpo/assets``)."""
    path = ASSETS_DIR / str(name)
    if must_exist and not path.exists():
        available = sorted(p.name for p in ASSETS_DIR.iterdir() if not p.name.startswith(("_", ".")))
        raise FileNotFoundError(f"no shipped asset {name!r} in {ASSETS_DIR}; available: {available}")
    return str(path)


def register_resolver() -> None:
    """Register ``${htgrpo_asset:NAME}`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("htgrpo_asset"):
        # Resolving never fails: a missing asset is reported by whoever loads it, naming its config key.
        OmegaConf.register_new_resolver("htgrpo_asset", lambda name: asset_path(name, must_exist=False))


register_resolver()
