"""Shared test fixtures. Nothing here reaches a model hub."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(module_name: str, path: Path):
    """Import a script that is not in a package (experiments/..., sweeps/...) as ``module_name``; registered in
    ``sys.modules`` first, because dataclasses look their module up there."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
CONFIG_DIR = REPO_ROOT / "conf"


def shared_data_dir() -> Path:
    """The official benchmark files (``../shared/data``), or ``$HTGRPO_SHARED_DATA``."""
    return Path(os.environ.get("HTGRPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a whole test module: tiny tensors gain nothing from threads, and on a busy 2-core
    machine OpenMP spin-waits cost more than they give. Use with
    ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "geneval" / "evaluation_metadata.jsonl").exists():
        pytest.skip(f"official benchmark files not found at {path} (set HTGRPO_SHARED_DATA)")
    return path


@pytest.fixture
def compose():
    """``compose(config_name, overrides)`` -> DictConfig with the hydra node, paths pointed at tmp."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(config_name: str, overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)

    yield _compose
    GlobalHydra.instance().clear()
