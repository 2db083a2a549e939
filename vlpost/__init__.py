"""vlpost: post-training for vision-language models (align, SFT, DPO, GRPO) on WebDataset shards."""

__version__ = "0.1.0"
