"""htgrpo: reinforcement-learning fine-tuning of image generators (HT-GRPO, MAR-GRPO and baselines)."""

__version__ = "0.1.0"

from htgrpo import assets as _assets  # noqa: E402,F401  (registers the ${htgrpo_asset:NAME} config resolver)
