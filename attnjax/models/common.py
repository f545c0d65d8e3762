"""Pieces every port shares: family names, activations, config checks, logits selection."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# model_type values of the Llama-like decoders (attnjax/models/llama.py).
LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
# Causal language models: GPT-2 and the Llama-like decoders. Everything else (BERT) is
# a bidirectional encoder with [CLS]/[SEP] tokens.
DECODER_FAMILIES = ("gpt2",) + LLAMA_FAMILIES
SUPPORTED_FAMILIES = ("bert",) + DECODER_FAMILIES


def is_decoder(family: str) -> bool:
    """True for the causal decoders (GPT-2, Llama-like): causal attention, next-token
    logits, tokens shown decoded, position 0 / BOS as the sink, no [CLS]/[SEP]."""
    return family in DECODER_FAMILIES


# Model.forward(logits=...): which positions of a decoder get next-token logits.
# "all": (B, T, V); "last": the last real (mask True) position of each sequence, (B, V);
# "none": no LM head at all (at 32k tokens and a 128k vocabulary, (T, V) takes 16 GB).
LOGITS_OPTIONS = ("all", "last", "none")


def check_logits_option(logits) -> str:
    if logits not in LOGITS_OPTIONS:
        raise ValueError(f"logits={logits!r}; pass one of {LOGITS_OPTIONS} (all positions, the last "
                         "real position of each sequence, or none).")
    return logits


def last_real_positions(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, T, D) at each sequence's last position where mask (B, T) is True -> (B, D)."""
    seq_len = mask.shape[1]
    last = seq_len - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # (B,)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # (B, D)


def lm_head_input(last: jax.Array, mask: jax.Array, logits: str):
    """What a decoder's LM head reads for ``logits``: last (B, T, D) for "all", the last
    real positions (B, D) for "last", None for "none" (no head at all)."""
    if logits == "none":
        return None
    return last_real_positions(last, mask) if logits == "last" else last

# Hugging Face activation names -> the exact function transformers uses.
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),       # erf GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),    # tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# The layers every port builds from, set for float32 parity with PyTorch: full-precision
# matmuls (no TF32 on GPU, no one-pass bf16 on TPU) and LayerNorm's two-pass variance
# (Flax's default E[x^2] - E[x]^2 loses digits when activations share a large offset).
MATMUL_PRECISION = lax.Precision.HIGHEST
Dense = functools.partial(nn.Dense, precision=MATMUL_PRECISION)
LayerNorm = functools.partial(nn.LayerNorm, use_fast_variance=False)


class UnsupportedConfigError(ValueError):
    """A checkpoint's config asks for something the port does not implement."""


def activation(name: str, option: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise UnsupportedConfigError(
            f"Unsupported activation {name!r} (config option {option}); attnjax's ports "
            f"implement {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


def reject_options(hf: Mapping[str, Any], family: str, rules: Mapping[str, Any]) -> None:
    """Raise for config options whose value the port does not implement.

    ``rules`` maps an option name to the only value the port supports (an option
    absent from the config takes Hugging Face's default, which is supported).
    """
    for option, supported in rules.items():
        if option in hf and hf[option] is not None and hf[option] != supported:
            raise UnsupportedConfigError(
                f"The {family} config sets {option}={hf[option]!r}; attnjax's {family} port "
                f"only implements {option}={supported!r}. Use a checkpoint without it."
            )


def require(hf: Mapping[str, Any], option: str, family: str) -> int:
    """A size option the port cannot default (widths, depths, head counts): a positive int."""
    if option not in hf:
        raise UnsupportedConfigError(f"The {family} config.json has no {option!r}; is it a {family} checkpoint?")
    value = hf[option]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedConfigError(
            f"The {family} config.json sets {option}={value!r}; it must be a positive integer."
        )
    return value
