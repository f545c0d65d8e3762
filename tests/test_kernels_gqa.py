"""Grouped-query attention, sliding windows and soft caps: the reference against a
brute-force numpy truth, the blockwise kernels against the reference, the front
door's errors, and the model's one call into the kernels (models.attention.attend).

The Pallas kernels' versions of these tests are in tests/test_pallas.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnjax import kernels
from attnjax.kernels import (
    MASK_VALUE,
    attention,
    blockwise_attention,
    reference_attention,
    reference_attention_weights,
)
from attnjax.models.attention import attend
from attnjax.trace import Capture
from tests.test_kernels import (
    BF16_OUT_TOL,
    BF16_STATS_TOL,
    BLOCKWISE_TILES,
    F32_TOL,
    F64_TOL,
    check_against_reference,
    make_inputs,
)

blockwise = functools.partial(blockwise_attention, block_sizes=BLOCKWISE_TILES)  # 32 x 16 tiles


# --------------------------------------------------------------------------- the truth, by brute force


def brute_force(q, k, v, mask, *, causal, window, softcap, scale):
    """Dense attention in float64 numpy, written from the definitions: K and V
    repeated per query head as transformers' repeat_kv does (head h reads kv head
    h // G), scores soft-capped, then visibility by mask, causality and window.
    Returns out (B, T, Hq, H), scores (capped, unmasked) and probs (B, Hq, T, T)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, _ = q.shape
    groups = heads // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # repeat_kv: kv0, kv0, kv1, kv1, ...
    mask = np.ones((batch, length), bool) if mask is None else np.asarray(mask, bool)
    out = np.zeros(q.shape)
    scores = np.zeros((batch, heads, length, length))
    probs = np.zeros((batch, heads, length, length))
    for b in range(batch):
        for h in range(heads):
            s = scale * q[b, :, h] @ k[b, :, h].T  # (T, T)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            for i in range(length):
                seen = [j for j in range(length) if mask[b, j] and (not causal or j <= i)
                        and (window is None or j > i - window)]
                if seen:
                    weights = np.exp(s[i, seen] - s[i, seen].max())
                    probs[b, h, i, seen] = weights / weights.sum()
            scores[b, h] = s
            out[b, :, h] = probs[b, h] @ v[b, :, h]
    return out, scores, probs


@pytest.mark.parametrize("heads,kv_heads,window,softcap", [
    (8, 2, 3, 2.0),      # GQA, a window shorter than the sequence, a cap near the scores' spread
    (4, 1, 50, 0.5),     # multi-query, a window longer than the sequence, a tight cap
])
def test_reference_matches_brute_force(heads, kv_heads, window, softcap):
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(1, 2, 11, heads, 8, dtype=jnp.float64, kv_heads=kv_heads,
                                    padding="full_row", causal=True)
        options = dict(causal=True, window=window, softcap=softcap, scale=0.4)
        out_np, scores_np, probs_np = brute_force(q, k, v, mask, **options)
        out, stats = reference_attention(q, k, v, mask=mask, stats=True, **options)
        scores, probs = reference_attention_weights(q, k, mask, True, 0.4, window=window, softcap=softcap)
    np.testing.assert_allclose(out, out_np, **F64_TOL)
    np.testing.assert_allclose(probs, probs_np, **F64_TOL)
    visible = probs_np > 0
    np.testing.assert_allclose(np.asarray(scores)[visible], scores_np[visible], **F64_TOL)
    assert np.all(np.asarray(scores)[~visible] == MASK_VALUE)
    # Statistics per query head, read off the truth's probabilities.
    plogp = np.where(visible, probs_np * np.log(np.where(visible, probs_np, 1.0)), 0.0)
    np.testing.assert_allclose(stats.entropy, -plogp.sum(-1), **F64_TOL)
    np.testing.assert_allclose(stats.max_prob, probs_np.max(-1), **F64_TOL)
    np.testing.assert_allclose(stats.first_mass, probs_np[..., 0], **F64_TOL)
    np.testing.assert_allclose(stats.received, np.einsum("bhij,bi->bhj", probs_np, np.asarray(mask, float)),
                               **F64_TOL)
    assert stats.entropy.shape == (2, heads, 11)


def test_window_of_one_attends_to_itself_only():
    # W = 1: each query sees exactly its own key, so out = v (of its kv head) and p_ii = 1.
    q, k, v, _ = make_inputs(2, 1, 9, 4, 8, kv_heads=2, padding="none")
    out, stats = reference_attention(q, k, v, causal=True, window=1, stats=True)
    np.testing.assert_allclose(out, jnp.repeat(v, 2, axis=2), rtol=1e-6)
    np.testing.assert_allclose(stats.self_mass, 1.0, rtol=1e-6)
    np.testing.assert_array_equal(stats.prev_mass, 0.0)
    np.testing.assert_array_equal(stats.first_mass[..., 1:], 0.0)


# --------------------------------------------------------------------------- blockwise against the reference

# (length, heads, kv_heads, window, softcap, padding, pool), all causal. Tiles are 32
# queries x 16 keys and no length here is a multiple of either: windows 5 and 1 sit
# inside one key tile, 40 spans several (a window as long as the sequence is in
# test_blockwise_several_kv_heads_per_step).
BLOCKWISE_CASES = {
    "gqa8/2-window5": (37, 8, 2, 5, None, "random", 4),
    "mqa4/1-window40-cap": (70, 4, 1, 40, 2.0, "full_row", 3),
    "gqa4/2-window1-nomask": (50, 4, 2, 1, None, "none", 5),
}


@pytest.mark.parametrize("case", list(BLOCKWISE_CASES))
def test_blockwise_float32_matches_reference(case):
    length, heads, kv_heads, window, softcap, padding, pool = BLOCKWISE_CASES[case]
    q, k, v, mask = make_inputs(length + heads, 2, length, heads, 16, kv_heads=kv_heads,
                                padding=padding, causal=True)
    check_against_reference(blockwise, q, k, v, mask, causal=True, pool=pool, window=window,
                            softcap=softcap, out_tol=F32_TOL, stats_tol=F32_TOL)


def test_blockwise_bfloat16_matches_reference():
    q, k, v, mask = make_inputs(4, 2, 70, 4, 64, dtype=jnp.bfloat16, kv_heads=1, padding="full_row",
                                causal=True)
    check_against_reference(blockwise, q, k, v, mask, causal=True, pool=5, window=20, softcap=5.0,
                            out_tol=BF16_OUT_TOL, stats_tol=BF16_STATS_TOL)


def test_blockwise_float64_softcap_without_causal_matches_reference_tightly():
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(5, 2, 45, 4, 16, dtype=jnp.float64, kv_heads=2, padding="full_row")
        check_against_reference(blockwise, q, k, v, mask, causal=False, pool=6, softcap=1.5,
                                out_tol=F64_TOL, stats_tol=F64_TOL)


def test_blockwise_several_kv_heads_per_step():
    # block_heads=2 walks both kv heads of a sequence (and their 4 query heads each) in
    # one step; the window is longer than the sequence (every causal key visible).
    q, k, v, mask = make_inputs(6, 2, 40, 8, 16, kv_heads=2, padding="random", causal=True)
    fn = functools.partial(blockwise_attention, block_sizes=kernels.BlockwiseBlockSizes(16, 8, block_heads=2))
    check_against_reference(fn, q, k, v, mask, causal=True, pool=3, window=64, softcap=4.0,
                            out_tol=F32_TOL, stats_tol=F32_TOL)


def test_blockwise_window_skips_blocks_outside_the_band():
    # NaN in v at keys 0..15 (key block 0) reaches every output row whose loop visits
    # that block (0 * NaN is NaN, masked or not): with window 8 the query blocks from
    # 32 on must skip it. NaN in q from query 64 on reaches dk, dv and received of every
    # key block whose loop visits those query blocks: keys 0..15 see queries up to 22.
    q, k, v, _ = make_inputs(7, 1, 128, 2, 16, kv_heads=1, padding="none")
    q = q.at[:, 64:].set(jnp.nan)
    options = dict(causal=True, window=8)
    out, stats = blockwise(q, k, v.at[:, :16].set(jnp.nan), stats=True, **options)
    assert np.all(np.isfinite(np.asarray(out[:, 32:64])))
    assert np.all(np.isfinite(np.asarray(stats.received[:, :, :16])))
    assert np.isnan(np.asarray(out[:, :32])).all()  # the poison is real where the block is visited

    def loss(k, v):  # the rows from 64 on get a zero cotangent but still a NaN delta
        return jnp.sum(blockwise(q, k, v, **options)[:, :64])

    dk, dv = jax.grad(loss, argnums=(0, 1))(k, v)
    assert np.all(np.isfinite(np.asarray(dk[:, :16]))) and np.all(np.isfinite(np.asarray(dv[:, :16])))
    assert np.isnan(np.asarray(dk[:, 64:])).all()


# --------------------------------------------------------------------------- gradients


def test_blockwise_gradients_match_reference():
    q, k, v, mask = make_inputs(8, 2, 45, 8, 16, kv_heads=2, padding="full_row", causal=True)
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    options = dict(mask=mask, causal=True, window=12, softcap=2.0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, **options) * cotangent)

    grads = jax.grad(loss(blockwise), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        assert g.shape == e.shape, name  # dk, dv per kv head: (B, T, Hkv, H)
        # Gradients sum T terms of O(1) (dk, dv also over the 4 query heads of a kv
        # head): float32 summation-order noise ~1e-5.
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
    np.testing.assert_array_equal(grads[0][1], 0.0)  # the fully padded sequence


def test_blockwise_check_grads_float64():
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(9, 1, 20, 4, 8, dtype=jnp.float64, kv_heads=2, padding="random")
        check_grads(lambda q, k, v: blockwise(q, k, v, mask=mask, causal=True, window=6, softcap=1.5),
                    (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- the front door


def test_attention_dispatch_with_gqa_window_softcap():
    q, k, v, mask = make_inputs(10, 2, 24, 6, 16, kv_heads=3, padding="random")
    options = dict(mask=mask, causal=True, window=7, softcap=3.0)
    expected, expected_stats = reference_attention(q, k, v, stats=True, pool=2, **options)
    for impl in ("auto", "reference", "blockwise"):
        out, stats = attention(q, k, v, stats=True, pool=2, impl=impl, **options)
        np.testing.assert_allclose(out, expected, err_msg=impl, **F32_TOL)
        np.testing.assert_allclose(stats.entropy, expected_stats.entropy, err_msg=impl, **F32_TOL)
        assert stats.pooled.shape == (2, 6, 2, 2)


def test_custom_function_gets_window_and_softcap_only_when_set():
    q, k, v, mask = make_inputs(11, 1, 8, 4, 8, kv_heads=2, padding="random")
    calls = []

    def plain(q, k, v, *, mask, causal, scale):  # knows nothing of windows or caps
        calls.append("plain")
        return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale)

    def modern(q, k, v, *, mask, causal, scale, window=None, softcap=None):
        calls.append((window, softcap))
        return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale, window=window,
                                   softcap=softcap)

    attention(q, k, v, mask=mask, causal=True, impl=plain)
    out = attention(q, k, v, mask=mask, causal=True, window=3, softcap=2.0, impl=modern)
    assert calls == ["plain", (3, 2.0)]
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask, causal=True, window=3, softcap=2.0))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kv_heads=4), ValueError, r"q has 6 heads and k/v have 4; .*multiple of the kv heads"),
    (dict(window=4), ValueError, r"window=4\) needs causal=True"),
    (dict(window=0, causal=True), ValueError, r"window=0\): expected None or a positive int"),
    (dict(window=True, causal=True), ValueError, r"window=True\)"),
    (dict(softcap=0.0), ValueError, r"softcap=0.0\): expected a positive cap"),
    (dict(softcap=-30), ValueError, r"softcap=-30.0\): expected a positive cap"),
    (dict(softcap="big"), TypeError, r"softcap=...\) must be a Python number"),
])
@pytest.mark.parametrize("entry", ["attention", "blockwise_attention", "reference_attention"])
def test_rejects_bad_gqa_window_softcap(kwargs, error, match, entry):
    kwargs = dict(kwargs)
    kv_heads = kwargs.pop("kv_heads", 2)
    q = np.zeros((1, 8, 6, 8), np.float32)
    kv = np.zeros((1, 8, kv_heads, 8), np.float32)
    with pytest.raises(error, match=match):
        getattr(kernels, entry)(q, kv, kv, **kwargs)


def test_traced_softcap_is_rejected():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="softcap"):
        jax.jit(lambda q, c: attention(q, q[:, :, :1], q[:, :, :1], softcap=c))(q, 30.0)


# --------------------------------------------------------------------------- the model's call


def test_attend_records_per_query_head_and_agrees_with_the_kernel():
    # The dense path (attention captured) and the streaming path (stats only) give the
    # same output and statistics; records are per query head, scores capped and scaled.
    q, k, v, mask = make_inputs(12, 2, 20, 4, 8, kv_heads=2, padding="random")
    options = dict(causal=True, scale=0.3, window=5, softcap=2.0, record=True)
    dense_capture = Capture(attention=True, scores=True, stats=True, pool=2)
    out, dense = jax.jit(functools.partial(attend, capture=dense_capture, **options))(q, k, v, mask)
    out_streamed, streamed = jax.jit(functools.partial(attend, capture=Capture(stats=True, pool=2), **options))(
        q, k, v, mask)
    assert dense["attention"].shape == dense["scores"].shape == (2, 4, 20, 20)
    expected = reference_attention(q, k, v, mask=mask, causal=True, scale=0.3, window=5, softcap=2.0)
    np.testing.assert_allclose(out, expected, **F32_TOL)
    np.testing.assert_allclose(out_streamed, expected, **F32_TOL)
    for name in ("entropy", "lse", "received", "pooled", "prev_mass"):
        np.testing.assert_allclose(getattr(streamed["stats"], name), getattr(dense["stats"], name),
                                   err_msg=name, **F32_TOL)
    probs, scores = np.asarray(dense["attention"]), np.asarray(dense["scores"])
    position = np.arange(20)
    outside = (position[None, :] > position[:, None]) | (position[None, :] <= position[:, None] - 5)  # (T, T)
    assert np.all(probs[:, :, outside] == 0.0) and np.all(scores[:, :, outside] == MASK_VALUE)
    inside = scores[scores != MASK_VALUE]
    assert inside.size and np.all(np.abs(inside) < 2.0)  # capped at c = 2
    # Query 0 always sees key 0, within every window.
    assert math.isclose(float(probs[0, 0, 0, 0]), 1.0, rel_tol=1e-6) or not bool(mask[0, 0])
