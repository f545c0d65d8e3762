"""Pieces the BERT and GPT-2 ports share: activations and config checks."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping

import flax.linen as nn
import jax
from jax import lax

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
