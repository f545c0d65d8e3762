"""BERT in Flax, with every intermediate returned.

Module names copy the Hugging Face checkpoint keys (``embeddings``,
``encoder/layer_N/attention/self/query``, ...), so checkpoints.py maps weights
mechanically: ``layer_N`` <-> ``layer.N``, ``kernel`` <-> ``weight`` (transposed:
torch Linear stores (out, in)), ``embedding``/``scale`` <-> ``weight``.

Numerics follow transformers' BertModel in eval mode with eager attention:
post-LayerNorm blocks, erf GELU, scores = q.k / sqrt(head_dim), key padding masked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from attnjax.models.attention import AttentionImpl, attend
from attnjax.models.common import Dense, LayerNorm, activation, reject_options, require
from attnjax.trace import Capture


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooling_layer: bool = True

    def __post_init__(self):
        activation(self.hidden_act, "hidden_act")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], add_pooling_layer: bool = True) -> "BertConfig":
        """Build from a config.json dict; reject options this port does not implement."""
        reject_options(hf, "bert", {
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "add_cross_attention": False,
        })
        return cls(
            vocab_size=require(hf, "vocab_size", "bert"),
            hidden_size=require(hf, "hidden_size", "bert"),
            num_hidden_layers=require(hf, "num_hidden_layers", "bert"),
            num_attention_heads=require(hf, "num_attention_heads", "bert"),
            intermediate_size=require(hf, "intermediate_size", "bert"),
            hidden_act=hf.get("hidden_act", "gelu"),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id") or 0,
            add_pooling_layer=add_pooling_layer,
        )


@struct.dataclass
class BertOutput:
    last_hidden_state: jax.Array           # (B, T, D)
    pooler_output: Optional[jax.Array]     # (B, D): tanh(dense(h[:, 0])), None without a pooler


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, inputs_embeds=None):
        c = self.config
        seq_len = input_ids.shape[1]
        words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")
        if inputs_embeds is None:
            inputs_embeds = words(input_ids)  # (B, T, D)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(
            jnp.arange(seq_len)
        )  # (T, D)
        types = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
            token_type_ids
        )  # (B, T, D)
        summed = inputs_embeds + positions[None] + types  # (B, T, D)
        return LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(summed)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, capture: Capture, record: bool, impl: AttentionImpl):
        c = self.config
        batch, seq_len, _ = x.shape
        split = lambda t: t.reshape(batch, seq_len, c.num_heads, c.head_dim)  # (B, T, N, H)
        q = split(Dense(c.hidden_size, name="query")(x))
        k = split(Dense(c.hidden_size, name="key")(x))
        v = split(Dense(c.hidden_size, name="value")(x))
        out, records = attend(
            q, k, v, mask, causal=False, scale=1.0 / math.sqrt(c.head_dim),
            capture=capture, record=record, impl=impl,
        )
        return out.reshape(batch, seq_len, c.hidden_size), records  # (B, T, D)


class BertResidualOutput(nn.Module):
    """dense -> add residual -> LayerNorm (HF's BertSelfOutput and BertOutput)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, residual):
        c = self.config
        projected = Dense(c.hidden_size, name="dense")(x)  # (B, T, D)
        return projected, LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(projected + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, capture, record, impl):
        context, records = BertSelfAttention(self.config, name="self")(x, mask, capture, record, impl)
        projected, out = BertResidualOutput(self.config, name="output")(context, x)
        if record and capture.attention_output:
            records["attention_output"] = projected
        return out, records


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        return activation(c.hidden_act, "hidden_act")(Dense(c.intermediate_size, name="dense")(x))


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, capture, record, impl):
        attended, records = BertAttention(self.config, name="attention")(x, mask, capture, record, impl)
        hidden = BertIntermediate(self.config, name="intermediate")(attended)  # (B, T, I)
        _, out = BertResidualOutput(self.config, name="output")(hidden, attended)  # (B, T, D)
        return out, records


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, capture, recorded_layers, impl):
        hidden_states = [x]
        records = []
        for i in range(self.config.num_layers):
            x, layer_records = BertLayer(self.config, name=f"layer_{i}")(
                x, mask, capture, i in recorded_layers, impl
            )
            hidden_states.append(x)
            if i in recorded_layers:
                records.append(layer_records)
        return x, hidden_states, records


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(Dense(self.config.hidden_size, name="dense")(x[:, 0]))  # (B, D)


class BertModule(nn.Module):
    """BertModel: embeddings -> encoder -> (pooler)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, mask, token_type_ids, capture: Capture, recorded_layers,
                 impl: AttentionImpl = "auto", inputs_embeds=None, logits: str = "all"):
        del logits  # an encoder has no LM head
        embedded = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids, inputs_embeds)
        last, hidden_states, records = BertEncoder(self.config, name="encoder")(
            embedded, mask, capture, recorded_layers, impl
        )
        pooled = BertPooler(self.config, name="pooler")(last) if self.config.add_pooling_layer else None
        return BertOutput(last_hidden_state=last, pooler_output=pooled), hidden_states, records
