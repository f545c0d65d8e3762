"""Flax ports of BERT, GPT-2 and the Llama-like decoders, and their checkpoint loader."""

from attnjax.models.bert import BertConfig, BertOutput
from attnjax.models.checkpoints import CheckpointError
from attnjax.models.common import LLAMA_FAMILIES, UnsupportedConfigError, is_decoder
from attnjax.models.gpt2 import GPT2Config, GPT2Output
from attnjax.models.llama import LlamaConfig, LlamaOutput
from attnjax.models.model import Model
from attnjax.models.rope import RopeConfig
from attnjax.models.structure import summary

__all__ = ["BertConfig", "BertOutput", "CheckpointError", "GPT2Config", "GPT2Output", "LLAMA_FAMILIES",
           "LlamaConfig", "LlamaOutput", "Model", "RopeConfig", "UnsupportedConfigError", "is_decoder",
           "summary"]
