"""Flax ports of BERT and GPT-2 and their checkpoint loader."""

from attnjax.models.bert import BertConfig, BertOutput
from attnjax.models.checkpoints import CheckpointError
from attnjax.models.common import UnsupportedConfigError
from attnjax.models.gpt2 import GPT2Config, GPT2Output
from attnjax.models.model import Model

__all__ = ["BertConfig", "BertOutput", "CheckpointError", "GPT2Config", "GPT2Output", "Model",
           "UnsupportedConfigError"]
