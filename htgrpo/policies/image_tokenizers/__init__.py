"""Image tokenizers: the ``ImageTokenizer`` protocol and its real implementations (MAGVIT-v2, diffusers VQModel).

The toy palette tokenizer of ShapesWorld (``htgrpo.policies.tokenizers``) follows the same calling conventions.
"""

from htgrpo.policies.image_tokenizers.base import (
    ImageTokenizer,
    MissingWeightsError,
    grid_for_size,
    resize_center_crop,
)
from htgrpo.policies.image_tokenizers.diffusers_vq import DiffusersVQImageTokenizer
from htgrpo.policies.image_tokenizers.magvit2 import MAGVITv2, MagvitImageTokenizer
from htgrpo.policies.image_tokenizers.tiny import write_tiny_dimoo_vq, write_tiny_magvit

__all__ = [
    "DiffusersVQImageTokenizer",
    "ImageTokenizer",
    "MAGVITv2",
    "MagvitImageTokenizer",
    "MissingWeightsError",
    "grid_for_size",
    "resize_center_crop",
    "write_tiny_dimoo_vq",
    "write_tiny_magvit",
]
