"""The image-tokenizer plug-in point: images <-> grids of discrete codes.

Every image tokenizer (MAGVIT-v2 for MMaDA, diffusers ``VQModel`` for Lumina-DiMOO, and any later one) follows the
``ImageTokenizer`` protocol below, so policies, samplers and rewards never depend on a concrete class:

- ``codebook_size``: number of distinct codes (8192 for both real tokenizers);
- ``downsample``: pixels per code along each side (16 for both), so an H x W image has a (H/16) x (W/16) grid;
- ``grid_for(height_px, width_px) -> (rows, cols)``;
- ``encode(uint8 (B,3,H,W)) -> LongTensor (B, rows*cols)`` row-major codes (float images in [0, 1] are accepted);
- ``decode(codes (B, rows*cols), (rows, cols)) -> uint8 (B,3,H,W)``;
- ``save_pretrained(directory)`` / ``from_pretrained(path_or_id, *, subfolder, config_key, device, dtype)``.

Resizing is the caller's job: ``encode`` only accepts sizes that are multiples of ``downsample``.
``resize_center_crop`` is the documented helper that turns an arbitrary image into such a size the way MMaDA's
``image_transform`` does (bicubic resize of the short side, then a centre crop).

Weights that are neither a local folder nor downloadable raise ``MissingWeightsError``; its message names the config
key, the hub repo id and the command that downloads the files.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from htgrpo.policies.llada import CheckpointNotFoundError

__all__ = [
    "ImageTokenizer",
    "MissingWeightsError",
    "grid_for_size",
    "images_to_unit_float",
    "unit_float_to_uint8",
    "resize_center_crop",
    "resolve_pretrained_dir",
    "PretrainedImageTokenizer",
]


@runtime_checkable
class ImageTokenizer(Protocol):
    """What the rest of htgrpo may assume about an image tokenizer (see the module docstring)."""

    codebook_size: int
    downsample: int

    def grid_for(self, height_px: int, width_px: int) -> tuple[int, int]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor: ...

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        subfolder: str | None = None,
        config_key: str = "policy.vq_model",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageTokenizer: ...


class MissingWeightsError(CheckpointNotFoundError):
    """Image-tokenizer weights are neither a local folder nor downloadable (offline, unknown id, missing files).

    ``config_key`` and ``repo_id`` are kept as attributes so an entry point can print just the message.
    """

    def __init__(self, message: str, *, config_key: str, repo_id: str):
        super().__init__(message)
        self.config_key = config_key
        self.repo_id = repo_id


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------


def grid_for_size(height_px: int, width_px: int, downsample: int) -> tuple[int, int]:
    """Token grid of an image: (rows, cols) = (height_px / downsample, width_px / downsample).

    Example: 512 x 512 with downsample 16 -> (32, 32); 768 x 1536 -> (48, 96).
    Raises ValueError naming the size when a side is not a positive multiple of ``downsample``.
    """
    h, w, d = int(height_px), int(width_px), int(downsample)
    if h <= 0 or w <= 0 or h % d or w % d:
        raise ValueError(
            f"image size {h}x{w} px (height x width) is not a positive multiple of the tokenizer's "
            f"downsampling factor {d}; use e.g. {max(d, h - h % d)}x{max(d, w - w % d)}"
        )
    return h // d, w // d


def images_to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) in [0, 255] -> float32 x / 255 in [0, 1]; float input must already lie in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a tensor (B, 3, H, W), got {shape}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 images in [0, 255] or float images in [0, 1], got dtype {images.dtype}")
    x = images.float()
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float images must lie in [0, 1] (got values in [{lo:.3g}, {hi:.3g}])")
    return x.clamp(0.0, 1.0)


def unit_float_to_uint8(x: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """[0, 1] float -> uint8: clip(x, 0, 1) * 255, then ``round`` (diffusers ``numpy_to_pil``, used by DiMOO) or
    ``floor`` (numpy ``astype(uint8)`` truncation, used by MMaDA's ``inference_t2i``)."""
    y = x.float().clamp(0.0, 1.0) * 255.0
    if rounding == "round":
        y = y.round()
    elif rounding == "floor":
        y = y.floor()
    else:
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    return y.to(torch.uint8)


def resize_center_crop(image: Any, size: int | Sequence[int]) -> torch.Tensor:
    """Resize an image so it covers ``size`` (bicubic, antialiased) and centre-crop it: MMaDA's ``image_transform``.

    ``image``: a PIL image or a uint8 tensor (3,H,W) / (B,3,H,W). ``size``: an int (square) or (height, width).
    Returns uint8 (B,3,h,w) ready for ``encode``. Scale factor s = max(h / H, w / W), so the shorter side fits.
    """
    import torchvision.transforms.functional as TF

    if isinstance(size, int):
        out_h = out_w = int(size)
    else:
        out_h, out_w = (int(v) for v in size)
    if not isinstance(image, torch.Tensor):
        image = TF.pil_to_tensor(image.convert("RGB"))  # uint8 (3,H,W)
    x = image if image.dim() == 4 else image.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a PIL image or a (B,3,H,W) / (3,H,W) tensor, got {tuple(image.shape)}")
    in_h, in_w = x.shape[-2:]
    scale = max(out_h / in_h, out_w / in_w)
    new_h, new_w = max(out_h, round(in_h * scale)), max(out_w, round(in_w * scale))
    xf = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
    xf = TF.resize(xf, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    xf = TF.center_crop(xf, [out_h, out_w])
    return xf.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Finding the weights
# ----------------------------------------------------------------------------------------------------------------


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip() not in ("0", "", "false", "False", "no")


def _looks_like_hub_id(name: str) -> bool:
    return not (os.path.isabs(name) or name.startswith((".", "~"))) and name.count("/") == 1


def missing_weights_message(
    what: str, name: str, config_key: str, default_repo: str, subfolder: str | None, reason: str
) -> str:
    """The one message a user sees when tokenizer weights are missing: what, why, how to download, which key."""
    repo = name if _looks_like_hub_id(name) else default_repo
    folder = "/path/to/" + repo.split("/")[-1]
    include = f' --include "{subfolder}/*"' if subfolder else ""
    return (
        f"cannot load the {what} from {config_key}={name!r}: {reason}. "
        f"Download it on a machine with network access: `hf download {repo}{include} --local-dir {folder}` "
        f"(older huggingface_hub: `huggingface-cli download {repo}{include} --local-dir {folder}`), "
        f"copy the folder here and pass `{config_key}={folder}`."
    )


def resolve_pretrained_dir(
    path_or_id: str | os.PathLike,
    *,
    subfolder: str | None,
    config_key: str,
    default_repo: str,
    what: str,
    required_any: Sequence[str],
) -> Path:
    """The local folder that holds a tokenizer's files: ``path_or_id[/subfolder]``.

    A local folder is used as is. A hub id is fetched with ``huggingface_hub.snapshot_download`` restricted to
    ``subfolder`` (so DiMOO's 16 GB LLM weights are not pulled just for its VQ-VAE); the local HF cache is used when
    ``HF_HUB_OFFLINE=1``. A local folder that is itself the subfolder (has ``config.json``, no ``subfolder``
    inside) is accepted too. The folder must contain ``config.json`` and at least one of ``required_any`` (weight file
    names); otherwise ``MissingWeightsError`` is raised with the download command.
    """
    name = str(path_or_id)

    def fail(reason: str) -> MissingWeightsError:
        return MissingWeightsError(
            missing_weights_message(what, name, config_key, default_repo, subfolder, reason),
            config_key=config_key,
            repo_id=name if _looks_like_hub_id(name) else default_repo,
        )

    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        root = Path(expanded)
    elif _looks_like_hub_id(name):
        try:
            from huggingface_hub import snapshot_download

            patterns = [f"{subfolder}/*"] if subfolder else None
            root = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=_hf_offline()))
        except Exception as err:  # offline cache miss, unknown repo, no network: all mean "not here"
            why = (
                "there is no local folder of that name, and with HF_HUB_OFFLINE set the hub id is not in the "
                "local Hugging Face cache"
                if _hf_offline()
                else f"download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            )
            raise fail(why) from None
    else:
        raise fail("that folder does not exist")
    folder = root / subfolder if subfolder else root
    if subfolder and not folder.is_dir() and (root / "config.json").is_file():
        folder = root  # the user pointed at the subfolder itself (e.g. .../Lumina-DiMOO/vqvae): accept it
    if not folder.is_dir():
        raise fail(f"there is no {subfolder!r} subfolder in {str(root)!r}")
    if not (folder / "config.json").is_file():
        raise fail(f"{str(folder)!r} has no config.json")
    if not any((folder / f).is_file() for f in required_any):
        raise fail(f"{str(folder)!r} has none of the weight files {', '.join(required_any)}")
    return folder


_CLASS_DEFAULT: Any = object()  # from_pretrained(subfolder=...) not given: the class's DEFAULT_SUBFOLDER


class PretrainedImageTokenizer(abc.ABC):
    """What the real image tokenizers share: one frozen ``torch.nn.Module`` (``self.module``), its device and dtype,
    the grid of a size, and ``from_pretrained``'s steps (resolve the folder, build and load the module, cast, move).

    A subclass sets ``DEFAULT_REPO``, ``DEFAULT_SUBFOLDER``, ``WHAT`` (the name in error messages) and
    ``WEIGHT_FILES`` (any one of them must be in the folder), and implements :meth:`load_module` and ``downsample``.
    """

    DEFAULT_REPO: str = ""
    DEFAULT_SUBFOLDER: str | None = None
    WHAT: str = "image tokenizer"
    WEIGHT_FILES: tuple[str, ...] = ()

    module: torch.nn.Module
    downsample: int

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def grid_for(self, height_px: int, width_px: int) -> tuple[int, int]:
        return grid_for_size(height_px, width_px, self.downsample)

    @classmethod
    @abc.abstractmethod
    def load_module(cls, folder: Path, *, path_or_id: str | os.PathLike, config_key: str) -> torch.nn.Module:
        """Build the module from the resolved ``folder`` and load its weights; errors name ``config_key``."""

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike | None = None,
        *,
        subfolder: str | None = _CLASS_DEFAULT,
        config_key: str = "policy.vq_model",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Load ``path_or_id[/subfolder]`` (a local folder or hub id; by default ``DEFAULT_REPO`` and
        ``DEFAULT_SUBFOLDER``; ``subfolder=None``: the folder itself), cast to ``dtype``, move to ``device``."""
        path_or_id = cls.DEFAULT_REPO if path_or_id is None else path_or_id
        subfolder = cls.DEFAULT_SUBFOLDER if subfolder is _CLASS_DEFAULT else subfolder
        folder = resolve_pretrained_dir(
            path_or_id,
            subfolder=subfolder,
            config_key=config_key,
            default_repo=cls.DEFAULT_REPO,
            what=cls.WHAT,
            required_any=cls.WEIGHT_FILES,
        )
        module = cls.load_module(folder, path_or_id=path_or_id, config_key=config_key)
        if dtype is not None:
            module = module.to(dtype=dtype)
        if device is not None:
            module = module.to(device=device)
        return cls(module)
