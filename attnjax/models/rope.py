"""Rotary position embeddings as transformers computes them (modeling_rope_utils.py).

``RopeConfig.from_hf_config`` reads both spellings a config.json may use:

- transformers v5: ``rope_parameters = {"rope_type", "rope_theta", "factor", ...}``;
- legacy: a top-level ``rope_theta`` plus ``rope_scaling = {"type" or "rope_type", ...}``
  (transformers folds these into rope_parameters: ``convert_rope_params_to_dict``).

Implemented rope types: ``default``, ``linear`` (inv_freq / factor) and ``llama3``
(``_compute_llama3_parameters``: long wavelengths divided by factor, short ones kept,
a smooth blend between). Every other type (yarn, dynamic, longrope, ...) changes the
frequencies or scales the scores in ways this port does not implement, so it is an
UnsupportedConfigError naming it.

Numerics: inv_freq is computed with float32 operands and float32 results in the same
order as transformers (``1 / theta ** (arange(0, d, 2) / d)``), because an inv_freq
computed in float64 and rounded at the end differs in about a third of its entries,
and the angle error grows with the position (5e-4 rad at position 8191). It matches
transformers' buffer to 1 ulp (see ``inverse_frequencies``). The rotation is
rotate-half (dimension i pairs with i + d/2), not interleaved pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.models.common import UnsupportedConfigError

DEFAULT_THETA = 10_000.0  # RotaryEmbeddingConfigMixin.default_theta
SUPPORTED_TYPES = ("default", "linear", "llama3")
TYPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """What the rotary embedding needs: the type, theta and the scaling parameters."""

    rope_type: str = "default"
    theta: float = DEFAULT_THETA
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: Optional[int] = None

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], family: str, max_positions: int) -> "RopeConfig":
        """Read rope_parameters (v5) or rope_theta + rope_scaling (legacy) from a config.json dict.

        max_positions: the model's max_position_embeddings, llama3's default
        original_max_position_embeddings.
        """
        if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise UnsupportedConfigError(
                f"The {family} config sets partial_rotary_factor={hf['partial_rotary_factor']!r}; "
                "attnjax rotates the whole head (partial_rotary_factor=1.0) only."
            )
        parameters = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if not isinstance(parameters, Mapping):
            raise UnsupportedConfigError(
                f"The {family} config's rope_parameters/rope_scaling is {parameters!r}; expected an object."
            )
        parameters = dict(parameters)
        if any(isinstance(value, Mapping) for value in parameters.values()):
            raise UnsupportedConfigError(
                f"The {family} config nests rope parameters per layer type ({sorted(parameters)}); "
                "attnjax implements one RoPE for every layer."
            )
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type not in SUPPORTED_TYPES:
            raise UnsupportedConfigError(
                f"The {family} config asks for rope_type={rope_type!r} (rope_parameters / rope_scaling); "
                f"attnjax implements RoPE types {list(SUPPORTED_TYPES)}. Use a checkpoint without "
                f"{rope_type!r} scaling."
            )
        if parameters.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise UnsupportedConfigError(
                f"The {family} config sets rope partial_rotary_factor={parameters['partial_rotary_factor']!r}; "
                "attnjax rotates the whole head only."
            )
        if parameters.get("attention_factor") not in (None, 1, 1.0):
            raise UnsupportedConfigError(
                f"The {family} config sets rope attention_factor={parameters['attention_factor']!r}; attnjax "
                f"implements rope_type={rope_type!r} without an attention factor."
            )
        missing = TYPE_KEYS[rope_type] - set(parameters) - {"original_max_position_embeddings"}
        if missing:
            raise UnsupportedConfigError(
                f"The {family} config's rope_type={rope_type!r} needs {sorted(missing)} in rope_parameters."
            )
        theta = parameters.get("rope_theta")
        if theta is None:
            theta = hf.get("rope_theta")
        if theta is None:
            theta = DEFAULT_THETA
        original = None
        if rope_type == "llama3":
            # standardize_rope_params: a top-level original_max_position_embeddings wins,
            # else the dict's, else max_position_embeddings.
            original = (hf.get("original_max_position_embeddings")
                        or parameters.get("original_max_position_embeddings")
                        or max_positions)
        return cls(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(parameters.get("factor", 1.0)),
            low_freq_factor=float(parameters.get("low_freq_factor", 1.0)),
            high_freq_factor=float(parameters.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=None if original is None else int(original),
        )


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, operation for operation as transformers."""
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)  # (d/2,)
    # theta ** exponent with float32 operands, correctly rounded to float32 (evaluated
    # in float64). torch's vectorised float32 pow is within 1 ulp of this, not always
    # equal: HF's own inv_freq differs by an ulp between CPUs and GPUs.
    power = (np.float64(f32(rope.theta)) ** exponent.astype(np.float64)).astype(f32)  # (d/2,)
    inv_freq = f32(1.0) / power  # (d/2,)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / f32(rope.factor)
    elif rope.rope_type == "llama3":
        inv_freq = llama3_frequencies(inv_freq, rope)
    return inv_freq.astype(f32)


def llama3_frequencies(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """transformers' _compute_llama3_parameters, in float32 and in its order of operations.

    torch evaluates ``scalar / tensor`` as ``reciprocal(tensor) * scalar``; written the
    same way here, the result equals transformers' bit for bit given the same inv_freq.
    """
    f32 = np.float32
    old = rope.original_max_position_embeddings
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    low_freq_wavelen = old / low    # Python floats, as in transformers
    high_freq_wavelen = old / high
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)  # (d/2,)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)  # (d/2,)
    smooth = ((f32(1) / wavelen) * f32(old) - f32(low)) / f32(high - low)  # (d/2,)
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled  # (d/2,)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def rotary_tables(inv_freq: np.ndarray, seq_len: int, dtype, offset=0) -> tuple[jax.Array, jax.Array]:
    """cos and sin (T, head_dim) for positions offset..offset+T-1, cast to the activations' dtype.

    Positions are 0..T-1 whatever the mask (transformers' default position_ids, right
    for right-padded batches); a cached generation step passes its offset (an int or a
    traced scalar), as transformers' cache_position does.
    """
    positions = jnp.arange(seq_len, dtype=jnp.float32) + offset  # (T,)
    angles = positions[:, None] * jnp.asarray(inv_freq)[None, :]  # (T, d/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (T, d)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, d) rotated by position: x * cos + rotate_half(x) * sin."""
    cos = cos[None, :, None, :]  # (1, T, 1, d)
    sin = sin[None, :, None, :]  # (1, T, 1, d)
    return x * cos + rotate_half(x) * sin  # (B, T, N, d)
