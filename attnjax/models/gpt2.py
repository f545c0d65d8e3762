"""GPT-2 in Flax, with every intermediate returned.

Module names copy the Hugging Face checkpoint keys (``wte``, ``wpe``, ``h_N``,
``ln_1``, ``attn/c_attn``, ``mlp/c_fc``, ``ln_f``). GPT-2 stores its projections as
Conv1D with (in, out) weights, the layout of a Flax Dense kernel, so none of them
is transposed on load. The LM head is tied to ``wte`` unless the config unties it.

Numerics follow transformers' GPT2LMHeadModel in eval mode with eager attention:
pre-LayerNorm blocks, tanh GELU, causal mask plus key padding, scores =
q.k / sqrt(head_dim) (/ (layer + 1) when scale_attn_by_inverse_layer_idx).

Hidden states: entry 0 is wte + wpe, entry l + 1 is block l's raw output. Note that
Hugging Face's last ``hidden_states`` entry has ``ln_f`` applied; ours does not
(every entry is the residual stream), and ``output.last_hidden_state`` is ln_f of it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from attnjax.models.attention import AttentionImpl, attend, attend_with_cache
from attnjax.models import kv_cache
from attnjax.models.common import (
    MATMUL_PRECISION,
    Dense,
    LayerNorm,
    activation,
    lm_head_input,
    reject_options,
    require,
)
from attnjax.trace import Capture


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    eos_token_id: int = 50256

    def __post_init__(self):
        activation(self.activation_function, "activation_function")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_positions(self) -> int:
        return self.n_positions

    def attention_scale(self, layer: int) -> float:
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "GPT2Config":
        """Build from a config.json dict; reject options this port does not implement."""
        reject_options(hf, "gpt2", {"add_cross_attention": False})
        eos = hf.get("eos_token_id", 50256)
        return cls(
            vocab_size=require(hf, "vocab_size", "gpt2"),
            n_embd=require(hf, "n_embd", "gpt2"),
            n_layer=require(hf, "n_layer", "gpt2"),
            n_head=require(hf, "n_head", "gpt2"),
            n_positions=hf.get("n_positions", 1024),
            n_inner=hf.get("n_inner"),
            activation_function=hf.get("activation_function", "gelu_new"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            eos_token_id=eos if isinstance(eos, int) else 50256,
        )


@struct.dataclass
class GPT2Output:
    logits: Optional[jax.Array]   # (B, T, V) with logits="all", (B, V) with "last", None with "none"
    last_hidden_state: jax.Array  # (B, T, D), after ln_f


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, mask, capture: Capture, record: bool, impl: AttentionImpl, cache=None, offset=0):
        c = self.config
        batch, seq_len, _ = x.shape
        qkv = Dense(3 * c.n_embd, name="c_attn")(x)  # (B, T, 3D)
        q, k, v = (
            t.reshape(batch, seq_len, c.n_head, c.head_dim)  # (B, T, N, H)
            for t in jnp.split(qkv, 3, axis=-1)
        )
        if cache is None:
            out, records = attend(
                q, k, v, mask, causal=True, scale=c.attention_scale(self.layer),
                capture=capture, record=record, impl=impl,
            )
        else:  # generation: positions offset.., keys and values from the cache (kv_cache.py)
            out, records = attend_with_cache(q, k, v, mask, cache, offset, scale=c.attention_scale(self.layer),
                                             capture=capture, record=record, impl=impl)
        projected = Dense(c.n_embd, name="c_proj")(out.reshape(batch, seq_len, c.n_embd))  # (B, T, D)
        if record and capture.attention_output:
            records["attention_output"] = projected
        return projected, records


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        hidden = activation(c.activation_function, "activation_function")(
            Dense(c.inner_size, name="c_fc")(x)
        )  # (B, T, I)
        return Dense(c.n_embd, name="c_proj")(hidden)  # (B, T, D)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, mask, capture, record, impl, cache=None, offset=0):
        c = self.config
        attended, records = GPT2Attention(c, self.layer, name="attn")(
            LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_1")(x), mask, capture, record, impl, cache, offset
        )
        x = x + attended  # (B, T, D)
        x = x + GPT2MLP(c, name="mlp")(LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_2")(x))
        return x, records


class GPT2Module(nn.Module):
    """GPT2LMHeadModel: wte + wpe -> blocks -> ln_f -> tied LM head."""

    config: GPT2Config

    @nn.compact
    def __call__(self, input_ids, mask, token_type_ids, capture: Capture, recorded_layers,
                 impl: AttentionImpl = "auto", inputs_embeds=None, logits: str = "all", cache=None, offset=0):
        """With ``cache`` (kv_cache.empty_cache's per-layer buffers) the tokens sit at positions
        offset.., attend over the cache, and the updated cache is returned as a fourth value."""
        del token_type_ids  # GPT-2 has no segment embeddings
        c = self.config
        seq_len = input_ids.shape[1]
        wte = nn.Embed(c.vocab_size, c.n_embd, name="wte")
        if inputs_embeds is None:
            inputs_embeds = wte(input_ids)  # (B, T, D)
        positions = nn.Embed(c.n_positions, c.n_embd, name="wpe")(offset + jnp.arange(seq_len))  # (T, D)
        x = inputs_embeds + positions[None]  # (B, T, D)
        hidden_states = [x]
        records, new_cache = [], []
        for i in range(c.n_layer):
            x, layer_records = GPT2Block(c, i, name=f"h_{i}")(
                x, mask, capture, i in recorded_layers, impl, None if cache is None else cache[i], offset)
            if cache is not None:
                new_cache.append(layer_records.pop(kv_cache.RECORD))
            hidden_states.append(x)
            if i in recorded_layers:
                records.append(layer_records)
        last = LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_f")(x)  # (B, T, D)
        head_input = lm_head_input(last, mask, logits)  # (B, [T,] D), or None: no (T, V) array at all
        if head_input is None:
            lm_logits = None
        elif c.tie_word_embeddings:
            lm_logits = jnp.einsum("...D,VD->...V", head_input, wte.embedding,
                                   precision=MATMUL_PRECISION)  # (B, [T,] V)
        else:
            lm_logits = Dense(c.vocab_size, use_bias=False, name="lm_head")(head_input)  # (B, [T,] V)
        output = GPT2Output(logits=lm_logits, last_hidden_state=last)
        if cache is not None:
            return output, hidden_states, records, tuple(new_cache)
        return output, hidden_states, records
