"""GenEval's vocabulary, shipped in the package: the 80 object names and the words of its prompt templates.

These are facts of the benchmark (github.com/djghosh13/geneval): ``prompts/object_names.txt`` (identical to
``evaluation/object_names.txt``, whose line ``i`` is the detector's class ``i``), and the colour, count and
relation words of ``prompts/create_prompts.py``. They live here so that nothing that needs them (the
training-prompt generator, tests, scorers) depends on a copy of the GenEval repository being on disk.

The colour and relation lists are defined beside the record types (:mod:`htgrpo.data.records`, which checks
metadata against them) and re-exported here, so this module is the one place to look for GenEval's words.
"""

from __future__ import annotations

from htgrpo.data.records import GENEVAL_COLORS, GENEVAL_RELATIONS

__all__ = [
    "GENEVAL_OBJECT_NAMES",
    "GENEVAL_COLORS",
    "GENEVAL_RELATIONS",
    "GENEVAL_COUNT_WORDS",
    "GENEVAL_COUNTS",
    "GENEVAL_NO_COLOR_CLASSES",
    "with_article",
    "plural",
]

GENEVAL_OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
"""GenEval's 80 object classes (COCO's, with GenEval's names), in ``object_names.txt`` order: index ``i`` is the
detector's class ``i``."""

GENEVAL_COUNT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
"""Number words of GenEval's counting prompts: ``GENEVAL_COUNT_WORDS[n]`` spells ``n``."""

GENEVAL_COUNTS: tuple[int, ...] = (2, 3, 4)
"""Counts GenEval's counting prompts ask for (``create_prompts.py``: 2 to ``max_count=4`` inclusive)."""

GENEVAL_NO_COLOR_CLASSES: tuple[str, ...] = ("person",)
"""Classes GenEval never gives a colour (no "[COLOR] person" prompts in the colors and color_attr tasks)."""


def with_article(phrase: str) -> str:
    """GenEval's article rule: ``an`` before a phrase whose first letter is a vowel (a, e, i, o, u), else ``a``.

    E.g. ``an orange``, ``an umbrella``, ``a bus``, ``an orange car``.
    """
    return f"an {phrase}" if phrase[:1] in "aeiou" else f"a {phrase}"


def plural(name: str) -> str:
    """GenEval's plural rule: ``name + "es"`` when the name ends in ``s``, else ``name + "s"``.

    It is applied as is, so the official prompts say ``sheeps``, ``skises``, ``buses``, ``computer mouses``.
    """
    return f"{name}es" if name.endswith("s") else f"{name}s"
