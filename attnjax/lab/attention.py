"""Reference attention variants, each a plain function under the ports' contract.

Every function here is ``fn(q, k, v, *, mask, causal, scale)`` as
attnjax.models.attention.attend calls it: q (B, T, Hq, H); k, v (B, S, Hkv, H) with
Hkv dividing Hq (query head h reads kv head h // (Hq // Hkv)); mask (B, S) bool, True at
real keys. They return (out (B, T, Hq, H), probs (B, Hq, T, S)); probs let
``Capture(attention=True)`` (and so every analysis) see the weights. Under jit, probs
nobody reads cost nothing.

- ``softmax``: attnjax's own kernel (kernels.attention); returns out only, and claims to
  be exact (``exact = True``), so the lab probes it through the dense softmax path;
- ``sliding_window(size)``: softmax over the last ``size`` keys (i - size < j <= i),
  as Mistral's sliding window;
- ``alibi``: softmax of q.k * scale - m_h (i - j) (Press et al. 2022, "Train short, test
  long"), slopes m_h = 2^(-8 (h + 1) / Hq), the paper's geometric sequence;
- ``linear``: causal linear attention (Katharopoulos et al. 2020, "Transformers are
  RNNs"), weights phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j') with phi = elu + 1,
  written in its quadratic form (same numbers as the O(T) recurrence); ``scale`` is
  not used, the normalisation replaces it.

How a function claims to be exact (to agree with softmax attention to float32 rounding,
which ``check_attention`` then verifies): an attribute ``fn.exact = True``, set by the
``exact`` decorator. How it is saved: ``fn.spec``, a "module:name" or
"module:factory(args)" string that ``attnjax.lab.load`` imports to re-attach it; plain
module-level functions get one from their module and name.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import kernels

NEG = -1e30  # score of an invisible key; its probability is exactly 0 after the softmax


def exact(fn):
    """Mark ``fn`` as computing exactly softmax attention; returns fn."""
    fn.exact = True
    return fn


def visible_keys(mask, causal: bool, queries: int, window: Optional[int] = None) -> jax.Array:
    """(B, 1, T, S) bool: which key each query may attend to (padding, causality, window)."""
    keys = mask.shape[1]
    query_pos = jnp.arange(queries)[:, None]  # (T, 1)
    key_pos = jnp.arange(keys)[None, :]  # (1, S)
    allowed = jnp.ones((queries, keys), bool)  # (T, S)
    if causal:
        allowed &= key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return mask[:, None, None, :] & allowed[None, None]  # (B, 1, T, S)


def grouped_scores(q, k) -> jax.Array:
    """q.k for every query head against its kv head: (B, Hq, T, S)."""
    batch, queries, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, queries, kv_heads, q_heads // kv_heads, dim)  # (B, T, Hkv, G, H)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k)  # (B, Hkv, G, T, S)
    return scores.reshape(batch, q_heads, queries, k.shape[1])  # (B, Hq, T, S)


def grouped_values(probs, v) -> jax.Array:
    """probs (B, Hq, T, S) times v (B, S, Hkv, H) -> (B, T, Hq, H)."""
    batch, q_heads, queries, keys = probs.shape
    kv_heads = v.shape[2]
    grouped = probs.reshape(batch, kv_heads, q_heads // kv_heads, queries, keys)  # (B, Hkv, G, T, S)
    out = jnp.einsum("bkgts,bskd->btkgd", grouped, v)  # (B, T, Hkv, G, H)
    return out.reshape(batch, queries, q_heads, v.shape[-1])  # (B, T, Hq, H)


def masked_softmax(scores, visible) -> jax.Array:
    """Softmax over visible keys; a row with none is all zeros. (B, Hq, T, S)."""
    scores = jnp.where(visible, scores, NEG)  # (B, Hq, T, S)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.where(visible.any(-1, keepdims=True), probs, 0.0)


@exact
def softmax(q, k, v, *, mask, causal, scale, **options):
    """attnjax's softmax kernel (kernels.attention, impl "auto"): out (B, T, Hq, H) only."""
    return kernels.attention(q, k, v, mask=mask, causal=causal, scale=scale, **options)


def windowed(q, k, v, *, mask, causal, scale, size: int):
    """Softmax attention over the last ``size`` keys of each query: (out, probs)."""
    visible = visible_keys(mask, causal, q.shape[1], window=size)  # (B, 1, T, S)
    probs = masked_softmax(grouped_scores(q, k) * scale, visible)  # (B, Hq, T, S)
    return grouped_values(probs, v), probs


def sliding_window(size: int):
    """A softmax attention function whose query i sees keys i - size < j <= i."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"sliding_window(size={size!r}): expected a positive number of keys.")
    fn = functools.partial(windowed, size=size)
    fn.spec = f"attnjax.lab.attention:sliding_window({size})"
    fn.__name__ = f"sliding_window_{size}"
    return fn


def alibi_slopes(heads: int) -> jax.Array:
    """(Hq,) ALiBi slopes 2^(-8 (h + 1) / Hq) (Press et al. 2022)."""
    return 2.0 ** (-8.0 * jnp.arange(1, heads + 1, dtype=jnp.float32) / heads)


def alibi(q, k, v, *, mask, causal, scale):
    """Softmax of q.k * scale minus slope_h times the query-key distance: (out, probs)."""
    queries, keys = q.shape[1], k.shape[1]
    distance = jnp.abs(jnp.arange(queries)[:, None] - jnp.arange(keys)[None, :]).astype(jnp.float32)  # (T, S)
    bias = -alibi_slopes(q.shape[2])[:, None, None] * distance[None]  # (Hq, T, S)
    scores = grouped_scores(q, k) * scale + bias[None]  # (B, Hq, T, S)
    probs = masked_softmax(scores, visible_keys(mask, causal, queries))
    return grouped_values(probs, v), probs


def linear(q, k, v, *, mask, causal, scale):
    """Linear attention with phi = elu + 1 (module docstring): (out, probs)."""
    del scale  # the row normalisation takes its place
    weights = grouped_scores(jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0)  # (B, Hq, T, S), all > 0
    weights = jnp.where(visible_keys(mask, causal, q.shape[1]), weights, 0.0)
    total = weights.sum(-1, keepdims=True)  # (B, Hq, T, 1)
    probs = weights / jnp.where(total > 0, total, 1.0)
    return grouped_values(probs, v), probs


VARIANTS = {"softmax": softmax, "sliding_window": sliding_window(8), "alibi": alibi, "linear": linear}
