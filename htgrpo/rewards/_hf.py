"""Loading frozen transformers scorer models (detector, CLIP, VQA) with start-up errors that say what to do.

A scorer model is named by a Hub repo id or a local ``save_pretrained`` folder. Without network (or with
``HF_HUB_OFFLINE=1``) a repo id only works when it is already in the Hugging Face cache; otherwise the error
names the config key, the repo id and how to download it or pass a local folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from htgrpo.config import ConfigError


def load_pretrained(loader: Callable[..., Any], name: str, key: str, what: str, **kwargs: Any) -> Any:
    """``loader(name, **kwargs)`` (a ``from_pretrained``), turning "not found / offline" into a ``ConfigError``.

    Args:
        loader: e.g. ``Mask2FormerForUniversalSegmentation.from_pretrained``.
        name: Hub repo id or local folder.
        key: the config key that holds ``name`` (the error names it).
        what: what the model is for, for the message.
    """
    path = Path(str(name)).expanduser()
    local = path.exists()
    if not local and (str(name).startswith((".", "/", "~")) or str(name).count("/") > 1):
        raise ConfigError(key, f"{name} does not exist: pass a local save_pretrained folder or a Hub repo id ({what})")
    try:
        return loader(str(path) if local else str(name), **kwargs)
    except (OSError, ValueError) as err:
        if local:
            raise ConfigError(key, f"cannot load {what} from the folder {path}: {err}") from None
        raise ConfigError(
            key,
            f"cannot load {what} {name!r} (not in the local Hugging Face cache, or offline: {type(err).__name__}). "
            f"Download it once with `huggingface-cli download {name} --local-dir DIR` and set this key to DIR "
            "(a local save_pretrained folder), or run once with network so it lands in the cache",
        ) from None

