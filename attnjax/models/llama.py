"""The Llama-like decoders in Flax: llama, mistral, qwen2, qwen3, gemma, gemma2.

One config-driven module (as penzai's llamalike_common): the families differ only in
LlamaConfig fields, which ``LlamaConfig.from_hf_config`` reads from config.json with
transformers' per-family defaults and semantics:

======  ==============================================================================
family  what differs from Llama
======  ==============================================================================
llama   ``attention_bias`` on q/k/v/o; ``mlp_bias`` must be false (not implemented)
mistral ``sliding_window`` on every layer when set (default 4096); no biases
qwen2   q/k/v biases always, o never; windows only with ``use_sliding_window``, on
        layers >= ``max_window_layers`` (or as an explicit ``layer_types`` says)
qwen3   as qwen2 for windows; ``attention_bias``; per-head q/k RMSNorm before RoPE;
        head_dim defaults to 128
gemma   RMSNorm scales by (1 + w); embeddings * sqrt(hidden) (cast to the weights'
        dtype); tied head; GeGLU (``hidden_act`` "gelu" means the tanh GELU)
gemma2  as gemma, plus post-attention / pre- and post-feedforward norms, attention
        and final logit soft-capping, scale query_pre_attn_scalar ** -0.5, and
        ``layer_types`` windows (even layers sliding, odd full, by default); its
        activation is ``hidden_activation``
======  ==============================================================================

Module names copy the checkpoint keys after the ``model.`` prefix (``embed_tokens``,
``layers_N/self_attn/q_proj``, ``mlp/gate_proj``, ``input_layernorm``, ``norm``,
``lm_head``); every Dense kernel is a torch Linear (out, in), transposed on load.

Numerics follow transformers' eager attention: RMSNorm in float32, cast back; scores
q.k * scale, soft-capped, then masked; softmax in float32. Positions are 0..T-1
(right padding). Grouped-query attention passes k and v with their own (fewer) heads
to the kernels, which never repeat them; the Trace holds one map per query head.

Precision: params and activations use ``config.dtype`` (float32 by default; bfloat16
halves the memory), norms and softmax compute in float32 as transformers does, and
attention statistics are always float32.

Hidden states: entry 0 is the (scaled) embedding, entry l + 1 is block l's raw output;
``output.last_hidden_state`` is the final norm of the last one (transformers puts
that normed tensor in its last hidden_states entry).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from attnjax.models import kv_cache
from attnjax.models.attention import AttentionImpl, attend, attend_with_cache
from attnjax.models.common import (
    LLAMA_FAMILIES,
    MATMUL_PRECISION,
    Dense,
    UnsupportedConfigError,
    activation,
    lm_head_input,
    reject_options,
    require,
)
from attnjax.models.rope import RopeConfig, apply_rotary, inverse_frequencies, rotary_tables
from attnjax.trace import Capture

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# transformers' config-class defaults, used when config.json omits a key.
FAMILY_DEFAULTS = {
    "llama": dict(num_key_value_heads=None, head_dim=None, act="silu", max_position_embeddings=2048,
                  tie_word_embeddings=False),
    "mistral": dict(num_key_value_heads=8, head_dim=None, act="silu", max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, head_dim=None, act="silu", max_position_embeddings=32768,
                  tie_word_embeddings=False, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, act="silu", max_position_embeddings=32768,
                  tie_word_embeddings=False, sliding_window=4096, max_window_layers=28),
    "gemma": dict(num_key_value_heads=16, head_dim=256, act="gelu_pytorch_tanh", max_position_embeddings=8192,
                  tie_word_embeddings=True),
    "gemma2": dict(num_key_value_heads=4, head_dim=256, act="gelu_pytorch_tanh", max_position_embeddings=8192,
                   tie_word_embeddings=True, sliding_window=4096, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}
# Options some family reads whose non-default values this port does not implement.
UNSUPPORTED = {
    "llama": {"mlp_bias": False},
    "gemma": {"use_bidirectional_attention": False},
    "gemma2": {"use_bidirectional_attention": False},
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False                  # biases on q/k/v_proj
    o_bias: bool = False                    # bias on o_proj
    qk_norm: bool = False                   # Qwen3: RMSNorm of each q and k head before RoPE
    norm_offset: bool = False               # Gemma: RMSNorm scales by (1 + w)
    scale_embeddings: bool = False          # Gemma: embeddings * sqrt(hidden_size)
    sandwich_norms: bool = False            # Gemma 2: norms after attention and around the MLP
    tie_word_embeddings: bool = False
    query_pre_attn_scalar: Optional[float] = None     # Gemma 2: scale = this ** -0.5
    attn_logit_softcapping: Optional[float] = None    # Gemma 2: scores -> c tanh(s / c)
    final_logit_softcapping: Optional[float] = None   # Gemma 2: logits -> c tanh(l / c)
    windows: Tuple[Optional[int], ...] = ()  # per layer: None (full attention) or the window W
    dtype: str = "float32"                  # params and activations

    def __post_init__(self):
        activation(self.hidden_act, "hidden_activation" if self.model_type == "gemma2" else "hidden_act")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"The {self.model_type} config has num_attention_heads={self.num_attention_heads}, not a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}; grouped-query attention "
                "needs each kv head to serve the same number of query heads."
            )
        if len(self.windows) != self.num_hidden_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for {self.num_hidden_layers} layers.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; attnjax runs decoders in {sorted(DTYPES)}.")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def attention_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return self.head_dim ** -0.5

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "LlamaConfig":
        """Build from a config.json dict with transformers' defaults for the family;
        reject options this port does not implement (UnsupportedConfigError names them)."""
        family = hf.get("model_type")
        if family not in LLAMA_FAMILIES:
            raise UnsupportedConfigError(f"model_type={family!r} is not one of {LLAMA_FAMILIES}.")
        defaults = FAMILY_DEFAULTS[family]
        reject_options(hf, family, UNSUPPORTED.get(family, {}))
        # A key config.json omits takes the config class's default; an explicit null
        # num_key_value_heads / head_dim means "as many as the query heads" / hidden // heads.
        get = lambda key: hf[key] if key in hf else defaults.get(key)  # noqa: E731
        heads = require(hf, "num_attention_heads", family)
        hidden = require(hf, "hidden_size", family)
        layers = require(hf, "num_hidden_layers", family)
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            if hf.get(key) is not None:
                require(hf, key, family)
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        max_positions = get("max_position_embeddings") or defaults["max_position_embeddings"]
        if family == "gemma2":
            act = hf.get("hidden_activation", defaults["act"])
        else:
            act = hf.get("hidden_act", defaults["act"])
            if family == "gemma" and act == "gelu":  # GemmaConfig.__post_init__: legacy name for tanh GELU
                act = "gelu_pytorch_tanh"
        bias = bool(hf.get("attention_bias", False)) and family != "mistral"
        gemma = family in ("gemma", "gemma2")
        return cls(
            model_type=family,
            vocab_size=require(hf, "vocab_size", family),
            hidden_size=hidden,
            intermediate_size=require(hf, "intermediate_size", family),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            hidden_act=act,
            rope=RopeConfig.from_hf_config(hf, family, max_positions),
            qkv_bias=bias or family == "qwen2",
            o_bias=bias and family != "qwen2",
            qk_norm=family == "qwen3",
            norm_offset=gemma,
            scale_embeddings=gemma,
            sandwich_norms=family == "gemma2",
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            query_pre_attn_scalar=get("query_pre_attn_scalar") if family == "gemma2" else None,
            attn_logit_softcapping=get("attn_logit_softcapping") if family == "gemma2" else None,
            final_logit_softcapping=get("final_logit_softcapping") if family == "gemma2" else None,
            windows=layer_windows(hf, family, layers),
            dtype=dtype,
        )


def layer_windows(hf: Mapping[str, Any], family: str, layers: int) -> Tuple[Optional[int], ...]:
    """Each layer's sliding window (None: full attention), as transformers decides it."""
    defaults = FAMILY_DEFAULTS[family]
    window = hf.get("sliding_window", defaults.get("sliding_window"))
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UnsupportedConfigError(f"The {family} config sets sliding_window={window!r}; expected a positive int.")
    if family == "mistral":  # MistralModel: one sliding mask for every layer when set
        # (transformers ignores a Mistral config's layer_types, and so does attnjax).
        return (window,) * layers
    if family in ("llama", "gemma"):
        return (None,) * layers
    if family in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window", False) else None
        first = hf.get("max_window_layers", defaults["max_window_layers"])
        default_types = [SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION
                         for i in range(layers)]
    else:  # gemma2: even layers slide, odd layers see everything
        default_types = [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(layers)]
    layer_types = hf.get("layer_types") or default_types
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != layers:
        raise UnsupportedConfigError(
            f"The {family} config's layer_types={layer_types!r} must list one type per layer ({layers})."
        )
    unknown = sorted({t for t in layer_types if t not in (FULL_ATTENTION, SLIDING_ATTENTION)}, key=str)
    if unknown:
        raise UnsupportedConfigError(
            f"The {family} config's layer_types holds {unknown}; attnjax implements "
            f"{FULL_ATTENTION!r} and {SLIDING_ATTENTION!r} layers."
        )
    if SLIDING_ATTENTION in layer_types and window is None:
        raise UnsupportedConfigError(
            f"The {family} config's layer_types has sliding_attention layers, but no sliding window "
            "(sliding_window is null" + (", or use_sliding_window is false" if family != "gemma2" else "")
            + "); transformers cannot build that mask either."
        )
    return tuple(window if t == SLIDING_ATTENTION else None for t in layer_types)


@struct.dataclass
class LlamaOutput:
    logits: Optional[jax.Array]   # (B, T, V) with logits="all", (B, V) with "last", None with "none"
    last_hidden_state: jax.Array  # (B, T, D), after the final norm


class RMSNorm(nn.Module):
    """x / rms(x) in float32, times w (Llama: cast back first) or (1 + w) (Gemma: then cast)."""

    epsilon: float
    offset: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("scale", init, (x.shape[-1],), self.dtype)  # (D,)
        weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)  # (1, ..., D)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        if self.offset:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
        return weight * normed.astype(x.dtype)


def make_norm(config: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, config.norm_offset, config.compute_dtype, name=name)


def make_dense(config: LlamaConfig, features: int, bias: bool, name: str) -> nn.Dense:
    dtype = config.compute_dtype
    return Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, mask, capture: Capture, record: bool, impl: AttentionImpl,
                 cache=None, offset=0):
        c = self.config
        batch, seq_len, _ = x.shape
        q = make_dense(c, c.num_heads * c.head_dim, c.qkv_bias, "q_proj")(x)  # (B, T, Nq*H)
        k = make_dense(c, c.num_kv_heads * c.head_dim, c.qkv_bias, "k_proj")(x)  # (B, T, Nkv*H)
        v = make_dense(c, c.num_kv_heads * c.head_dim, c.qkv_bias, "v_proj")(x)  # (B, T, Nkv*H)
        q = q.reshape(batch, seq_len, c.num_heads, c.head_dim)  # (B, T, Nq, H)
        k = k.reshape(batch, seq_len, c.num_kv_heads, c.head_dim)  # (B, T, Nkv, H)
        v = v.reshape(batch, seq_len, c.num_kv_heads, c.head_dim)  # (B, T, Nkv, H)
        if c.qk_norm:  # one RMSNorm over head_dim, shared by the heads
            q = make_norm(c, "q_norm")(q)
            k = make_norm(c, "k_norm")(k)
        q = apply_rotary(q, cos, sin)  # (B, T, Nq, H)
        k = apply_rotary(k, cos, sin)  # (B, T, Nkv, H)
        options = dict(window=c.windows[self.layer], softcap=c.attn_logit_softcapping)
        if cache is None:
            out, records = attend(q, k, v, mask, causal=True, scale=c.attention_scale, capture=capture,
                                  record=record, impl=impl, **options)  # (B, T, Nq, H)
        else:  # generation: positions offset.., keys and values from the cache (kv_cache.py)
            out, records = attend_with_cache(q, k, v, mask, cache, offset, scale=c.attention_scale, capture=capture,
                                             record=record, impl=impl, **options)  # (B, T, Nq, H)
        out = out.astype(x.dtype).reshape(batch, seq_len, c.num_heads * c.head_dim)  # (B, T, Nq*H)
        return make_dense(c, c.hidden_size, c.o_bias, "o_proj")(out), records  # (B, T, D)


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with the tanh GELU."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = activation(c.hidden_act, "hidden_act")
        gate = act(make_dense(c, c.intermediate_size, False, "gate_proj")(x))  # (B, T, I)
        up = make_dense(c, c.intermediate_size, False, "up_proj")(x)  # (B, T, I)
        return make_dense(c, c.hidden_size, False, "down_proj")(gate * up)  # (B, T, D)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; Gemma 2 also norms each sub-block's output before the residual add
    (there ``post_attention_layernorm`` norms the attention output, not the MLP input)."""

    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, mask, capture, record, impl, cache=None, offset=0):
        c = self.config
        attended, records = LlamaAttention(c, self.layer, name="self_attn")(
            make_norm(c, "input_layernorm")(x), cos, sin, mask, capture, record, impl, cache, offset
        )  # (B, T, D)
        if c.sandwich_norms:
            attended = make_norm(c, "post_attention_layernorm")(attended)
        if record and capture.attention_output:  # what the attention sub-block adds to the stream
            records["attention_output"] = attended
        x = x + attended  # (B, T, D)
        if c.sandwich_norms:
            mlp = LlamaMLP(c, name="mlp")(make_norm(c, "pre_feedforward_layernorm")(x))
            return x + make_norm(c, "post_feedforward_layernorm")(mlp), records
        return x + LlamaMLP(c, name="mlp")(make_norm(c, "post_attention_layernorm")(x)), records


class LlamaModule(nn.Module):
    """*ForCausalLM: embed_tokens -> layers -> norm -> LM head (tied to embed_tokens or lm_head)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, mask, token_type_ids, capture: Capture, recorded_layers,
                 impl: AttentionImpl = "auto", inputs_embeds=None, logits: str = "all", cache=None, offset=0):
        """With ``cache`` (kv_cache.empty_cache's per-layer buffers) the tokens sit at positions
        offset.. (RoPE included), attend over the cache, and the updated cache is returned
        as a fourth value."""
        del token_type_ids  # no segment embeddings
        c = self.config
        dtype = c.compute_dtype
        seq_len = input_ids.shape[1]
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype, name="embed_tokens")
        if inputs_embeds is None:
            x = embed(input_ids)  # (B, T, D)
            if c.scale_embeddings:  # sqrt(hidden) rounded to the weights' dtype, as transformers
                x = x * jnp.asarray(math.sqrt(c.hidden_size), jnp.float32).astype(embed.embedding.dtype)
        else:  # transformers adds no scale to inputs_embeds
            x = jnp.asarray(inputs_embeds).astype(dtype)  # (B, T, D)
        cos, sin = rotary_tables(inverse_frequencies(c.rope, c.head_dim), seq_len, dtype, offset)  # (T, H) each
        hidden_states = [x]
        records, new_cache = [], []
        for i in range(c.num_layers):
            x, layer_records = LlamaDecoderLayer(c, i, name=f"layers_{i}")(
                x, cos, sin, mask, capture, i in recorded_layers, impl, None if cache is None else cache[i], offset
            )
            if cache is not None:
                new_cache.append(layer_records.pop(kv_cache.RECORD))
            hidden_states.append(x)
            if i in recorded_layers:
                records.append(layer_records)
        last = make_norm(c, "norm")(x)  # (B, T, D)
        head_input = lm_head_input(last, mask, logits)  # (B, [T,] D), or None: no (T, V) array at all
        lm_logits = None
        if head_input is not None:
            if c.tie_word_embeddings:
                lm_logits = jnp.einsum("...D,VD->...V", head_input, embed.embedding,
                                       precision=MATMUL_PRECISION)  # (B, [T,] V)
            else:
                lm_logits = make_dense(c, c.vocab_size, False, "lm_head")(head_input)  # (B, [T,] V)
            if c.final_logit_softcapping is not None:
                cap = c.final_logit_softcapping
                lm_logits = jnp.tanh(lm_logits / cap) * cap
        output = LlamaOutput(logits=lm_logits, last_hidden_state=last)
        if cache is not None:
            return output, hidden_states, records, tuple(new_cache)
        return output, hidden_states, records
