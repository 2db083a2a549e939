"""Names and numbers shared by every module, in one place."""

IGNORE_INDEX = -100  # label value the loss skips
IMAGE_TOKEN = "<image>"  # one placeholder per image in message text; chat.py expands it
PAD_TOKEN = "<pad>"
SCHEMA_VERSION = 1  # shard sample schema (DESIGN §4)
SAMPLE_KINDS = ("caption", "sft", "preference", "prompt")
ROLES = ("system", "user", "assistant")
REWARD_TYPES = ("vqa", "refusal", "math", "code")
LOSS_REDUCTIONS = ("token", "sample", "square")  # SFT NLL averaging (train.loss_reduction; logprobs.loss_weights)
RUN_META_FILE = "vlpost.json"
PROJECTOR_FILE = "projector.safetensors"
LM_SUBDIR = "lm"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCAL_DIR = "local-dir:"  # open_clip's prefix for a tower folder (open_clip_config.json + weights)
OPEN_CLIP_CONFIG = "open_clip_config.json"
