"""htgrpo: reinforcement-learning fine-tuning of image generators (HT-GRPO, MAR-GRPO and baselines)."""

__version__ = "0.1.0"
