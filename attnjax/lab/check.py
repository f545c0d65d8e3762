"""check_attention: catch the usual mistakes of a custom attention function before training.

The checks run in this order on small random inputs (batch 2, 8 positions, 4 query heads,
head size 8, and with ``grouped=True`` a second call with 2 kv heads), and the first
failure raises AttentionCheckError naming its check:

- ``call``: fn(q, k, v, mask=, causal=, scale=) runs;
- ``shapes``: the output is (batch, query, heads, head_dim) floats, and probs (if fn
  returns (out, probs)) are (batch, heads, query, key); the message names the wrong
  dimension;
- ``finite``: no NaN or inf in the output;
- ``causality``: with causal=True, changing the inputs (q, k and v) at position s
  leaves every output at positions < s unchanged (to 1e-5: float32 reassociation only);
  so no query sees a later token;
- ``padding``: changing a key that the mask marks as padding changes no output;
- ``gradients``: jax.test_util.check_grads, reverse mode, first order, against central
  finite differences (float32: eps 1e-2 and a 5e-2 tolerance; a wrong backward pass is
  off by O(1));
- ``exact`` (only when fn claims it, ``fn.exact = True`` or ``exact=True``): agreement
  with dense softmax attention (kernels.reference) to 1e-5.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from attnjax import kernels

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 8, 4, 8
CAUSAL_TOLERANCE = 1e-5   # outputs before a changed position: equal up to float32 reassociation
EXACT_TOLERANCE = 1e-5    # sums over <= 8 keys in float32
GRAD_EPS, GRAD_TOLERANCE = 1e-2, 5e-2


class AttentionCheckError(ValueError):
    """A custom attention function failed one of check_attention's checks (``check``)."""

    def __init__(self, check: str, message: str):
        super().__init__(f"check_attention [{check}]: {message}")
        self.check = check


def inputs(seed: int, kv_heads: int = HEADS):
    """Random q (B, T, Hq, H), k and v (B, T, Hkv, H) as float32 numpy arrays (numpy, so that
    building and perturbing them compiles nothing)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BATCH, LENGTH, HEADS, HEAD_DIM), dtype=np.float32)  # (B, T, Hq, H)
    k = rng.standard_normal((BATCH, LENGTH, kv_heads, HEAD_DIM), dtype=np.float32)  # (B, T, Hkv, H)
    v = rng.standard_normal((BATCH, LENGTH, kv_heads, HEAD_DIM), dtype=np.float32)  # (B, T, Hkv, H)
    return q, k, v


def changed_at(x: np.ndarray, position: int) -> np.ndarray:
    """A copy of x (B, T, ...) with every value at sequence position ``position`` moved by 3."""
    x = x.copy()
    x[:, position] += 3.0
    return x


def jitted(fn):
    """fn under jax.jit (training jits it too), returning (out, probs or None); one per
    function, so checking it again (train checks too) reuses the compiled programs."""
    try:
        return cached_jit(fn)
    except TypeError:  # an unhashable callable: compile afresh
        return cached_jit.__wrapped__(fn)


@functools.lru_cache(maxsize=32)
def cached_jit(fn):
    def run(q, k, v, mask, causal):
        result = fn(q, k, v, mask=mask, causal=causal, scale=HEAD_DIM ** -0.5)
        return result if isinstance(result, tuple) else (result, None)

    return jax.jit(run, static_argnames="causal")


def call(fn, q, k, v, mask=None, causal=True):
    """fn, a jitted(...) function, on these inputs: (out, probs or None)."""
    mask = np.ones(q.shape[:2], bool) if mask is None else mask  # (B, T)
    out, probs = fn(q, k, v, mask, causal=causal)
    return out, probs


def check_shape(name: str, array, expected, axes) -> None:
    shape = getattr(array, "shape", None)
    if shape is None:
        raise AttentionCheckError("shapes", f"{name} is a {type(array).__name__}, not an array.")
    if len(shape) != len(expected):
        raise AttentionCheckError("shapes", f"{name} has {len(shape)} dimensions {tuple(shape)}; expected "
                                            f"{len(expected)}: ({', '.join(axes)}) = {expected}.")
    for axis, got, want in zip(axes, shape, expected):
        if got != want:
            raise AttentionCheckError("shapes", f"{name} has {axis}={got} (dimension {axes.index(axis)} of "
                                                f"{tuple(shape)}); expected {axis}={want}, shape {expected}.")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise AttentionCheckError("shapes", f"{name} has dtype {array.dtype}; expected floats.")


def check_attention(fn, *, exact: Optional[bool] = None, grouped: bool = False):
    """Run the module docstring's checks on ``fn``; return fn, or raise AttentionCheckError.

    exact: whether fn must agree with softmax attention; None reads ``fn.exact``.
    grouped: also call fn with fewer kv heads than query heads (grouped-query attention;
    train asks for it when the model has GPTConfig(kv_heads=...) below heads).
    """
    if not callable(fn):
        raise AttentionCheckError("call", f"expected a function fn(q, k, v, *, mask, causal, scale); "
                                          f"got {type(fn).__name__}.")
    exact = bool(getattr(fn, "exact", False)) if exact is None else exact
    original, fn = fn, jitted(fn)
    for kv_heads in ((HEADS, HEADS // 2) if grouped else (HEADS,)):
        q, k, v = inputs(0, kv_heads)
        try:
            out, probs = call(fn, q, k, v)
        except Exception as error:  # the user's code: report any failure as this check's
            raise AttentionCheckError("call", f"fn(q, k, v, mask=, causal=True, scale=) under jax.jit with q "
                                              f"{q.shape}, k and v {k.shape} raised {type(error).__name__}: "
                                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
        check_shape("output", out, q.shape, ("batch", "query", "heads", "head_dim"))
        if probs is not None:
            check_shape("probs", probs, (BATCH, HEADS, LENGTH, LENGTH), ("batch", "heads", "query", "key"))
        if not np.isfinite(np.asarray(out)).all():
            raise AttentionCheckError("finite", f"the output holds NaN or inf (with {kv_heads} kv heads).")
    q, k, v = inputs(0)
    check_causality(fn, q, k, v)
    check_padding(fn, q, k, v)
    check_gradients(fn, q, k, v)
    if exact:
        check_exact(fn, q, k, v)
    return original


def check_causality(fn, q, k, v) -> None:
    base, _ = call(fn, q, k, v)
    for position in range(1, LENGTH):
        out, _ = call(fn, *(changed_at(x, position) for x in (q, k, v)))
        diff = float(np.abs(np.asarray(out)[:, :position] - np.asarray(base)[:, :position]).max())
        if diff > CAUSAL_TOLERANCE:
            raise AttentionCheckError(
                "causality", f"changing token {position} changed the outputs at earlier positions "
                f"(by up to {diff:.3g}) under causal=True: position {position - 1} sees a later token. "
                "Mask keys j > i before normalising.")


def check_padding(fn, q, k, v) -> None:
    mask = np.ones((BATCH, LENGTH), bool)  # (B, T)
    mask[:, [2, LENGTH - 1]] = False
    base, _ = call(fn, q, k, v, mask=mask, causal=False)
    out, _ = call(fn, q, changed_at(k, 2), changed_at(v, 2), mask=mask, causal=False)
    diff = float(np.abs(np.asarray(out) - np.asarray(base)).max())
    if diff > CAUSAL_TOLERANCE:
        raise AttentionCheckError("padding", f"changing a key the mask marks as padding (position 2) changed "
                                             f"the outputs by up to {diff:.3g}; give keys with mask False no weight.")


def check_gradients(fn, q, k, v) -> None:
    def output(q, k, v):
        return call(fn, q, k, v)[0]

    try:
        check_grads(output, (q, k, v), order=1, modes=("rev",), eps=GRAD_EPS, atol=GRAD_TOLERANCE,
                    rtol=GRAD_TOLERANCE)
    except AssertionError as error:
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        raise AttentionCheckError("gradients", "the reverse-mode gradient disagrees with finite differences "
                                               f"(jax.test_util.check_grads: {first.strip()}); check a custom "
                                               "backward pass (jax.custom_vjp).") from None


@functools.partial(jax.jit, static_argnames="causal")
def reference(q, k, v, *, causal: bool):
    """Dense softmax attention (kernels' reference) without padding."""
    return kernels.attention(q, k, v, mask=jnp.ones(q.shape[:2], bool), causal=causal, scale=HEAD_DIM ** -0.5,
                             impl="reference")


def check_exact(fn, q, k, v) -> None:
    for causal in (True, False):
        out, _ = call(fn, q, k, v, causal=causal)
        want = reference(q, k, v, causal=causal)
        diff = float(np.abs(np.asarray(out) - np.asarray(want)).max())
        if diff > EXACT_TOLERANCE:
            raise AttentionCheckError("exact", f"fn claims to be exact (fn.exact = True) but differs from softmax "
                                               f"attention by up to {diff:.3g} (causal={causal}); drop the claim "
                                               "or fix the function.")
