"""attnjax.kernels: every implementation against reference.py, plus known answers.

The Pallas kernels' own tests (interpreter on CPU, Triton on a GPU, IR lowering for
CUDA and TPU) are in tests/test_pallas.py; here they appear only behind the front
door (dispatch, errors, statistics without gradient).
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
    AttentionStats,
    BlockwiseBlockSizes,
    MASK_VALUE,
    PallasBlockSizes,
    attention,
    blockwise_attention,
    pallas_attention,
    reference_attention,
    reference_attention_weights,
)

ON_CPU = jax.default_backend() == "cpu"
PER_QUERY = AttentionStats.PER_QUERY
FLOAT_STATS = [name for name in PER_QUERY if name != "argmax"] + ["received"]

# Small tiles so that every test sequence spans several blocks and ends in a partial one.
BLOCKWISE_TILES = BlockwiseBlockSizes(block_q=32, block_k=16)
PALLAS_TILES = PallasBlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)

# float32: both sides accumulate in float32 with full-precision matmuls; differences
# are summation order only (mean_distance and received reach ~T, hence rtol).
F32_TOL = dict(rtol=2e-5, atol=2e-5)
# float64 (blockwise, interpreter): the algorithms agree to rounding.
F64_TOL = dict(rtol=1e-11, atol=1e-11)
# bfloat16: the reference upcasts everything to float32; the outputs are rounded to
# bf16 (2^-8 relative) and the Pallas kernel also rounds p to bf16 before p @ v
# (FlashAttention practice). Scores still accumulate in float32 from exact bf16
# products, so the statistics stay close.
BF16_OUT_TOL = dict(rtol=2e-2, atol=2e-2)
BF16_STATS_TOL = dict(rtol=1e-3, atol=1e-3)


def make_inputs(seed, batch, length, heads, head_dim, dtype=jnp.float32, padding="random",
                causal=False, kv_heads=None):
    """q (B, T, N, H), k and v (B, T, kv_heads, H) (kv_heads defaults to N) and a key
    mask (B, T) or None.

    padding: "none" (mask None); "random" (random key padding, ~25%); "full_row"
    (batch element 1 entirely padded, so its rows have no visible key; under
    ``causal`` batch element 0 is also left-padded, giving fully masked early rows).
    """
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), dtype) for _ in range(2))
    if padding == "none":
        return q, k, v, None
    mask = rng.random((batch, length)) > 0.25
    if padding == "full_row":
        mask[1 % batch] = False
        if causal:
            mask[0, : min(3, length)] = False
    return q, k, v, jnp.asarray(mask)


def assert_stats_close(stats, expected, *, tol, probs):
    """Compare every statistic; argmax through the probability it points at."""
    for name in FLOAT_STATS:
        np.testing.assert_allclose(
            np.asarray(getattr(stats, name), np.float64), np.asarray(getattr(expected, name), np.float64),
            err_msg=name, **tol)
        assert getattr(stats, name).shape == getattr(expected, name).shape, name
    assert stats.argmax.dtype == jnp.int32
    # The argmax key must carry the row's maximum probability (ties may pick either).
    probs = np.asarray(probs, np.float64)
    picked = np.take_along_axis(probs, np.asarray(stats.argmax)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(picked, np.asarray(expected.max_prob, np.float64), err_msg="argmax", **tol)
    assert np.mean(np.asarray(stats.argmax) == np.asarray(expected.argmax)) > 0.99
    if expected.pooled is None:
        assert stats.pooled is None
    else:
        np.testing.assert_allclose(np.asarray(stats.pooled, np.float64), np.asarray(expected.pooled, np.float64),
                                   err_msg="pooled", **tol)
    for name in PER_QUERY + ("received",):
        assert np.all(np.isfinite(np.asarray(getattr(stats, name)))), name


def check_against_reference(impl_fn, q, k, v, mask, *, causal, pool, out_tol, stats_tol, scale=None,
                            **options):
    """impl_fn's output and statistics against the reference; ``options`` (window,
    softcap) go to both."""
    out, stats = impl_fn(q, k, v, mask=mask, causal=causal, stats=True, pool=pool, scale=scale, **options)
    out_ref, stats_ref = reference_attention(q, k, v, mask=mask, causal=causal, stats=True, pool=pool,
                                             scale=scale, **options)
    _, probs = jax.jit(reference_attention_weights, static_argnums=(3, 4),
                       static_argnames=tuple(options))(q, k, mask, causal, scale, **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(out_ref, np.float64), err_msg="out", **out_tol)
    assert_stats_close(stats, stats_ref, tol=stats_tol, probs=probs)
    # Without stats the output is the same computation (a separately compiled kernel,
    # so equal up to rounding rather than bit for bit).
    plain = impl_fn(q, k, v, mask=mask, causal=causal, scale=scale, **options)
    np.testing.assert_allclose(np.asarray(plain, np.float64), np.asarray(out, np.float64), **out_tol)


blockwise = functools.partial(blockwise_attention, block_sizes=BLOCKWISE_TILES)
pallas = functools.partial(pallas_attention, block_sizes=PALLAS_TILES)


# --------------------------------------------------------------------------- reference: known answers


def test_uniform_attention_statistics_are_known():
    # q = 0 makes every visible score 0: p is uniform over the n visible keys, so
    # entropy = ln n, max_prob = 1 / n, and mean_distance the mean |i - k| over them.
    batch, length, heads, head_dim = 1, 12, 2, 8
    rng = np.random.default_rng(0)
    q = jnp.zeros((batch, length, heads, head_dim))
    k = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    v = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    mask = jnp.asarray([[True] * 9 + [False] * 3])  # 9 real tokens, 3 padding
    out, stats = reference_attention(q, k, v, mask=mask, stats=True, pool=3)
    n = 9
    np.testing.assert_allclose(stats.entropy, math.log(n), rtol=1e-6)
    np.testing.assert_allclose(stats.max_prob, 1 / n, rtol=1e-6)
    np.testing.assert_allclose(stats.lse, math.log(n), rtol=1e-6)
    np.testing.assert_allclose(stats.first_mass, 1 / n, rtol=1e-6)
    distance = np.abs(np.arange(length)[:, None] - np.arange(n)[None, :]).mean(axis=1)
    np.testing.assert_allclose(stats.mean_distance[0, 0], distance, rtol=1e-6)
    # Padding keys receive nothing; each real key gets 1/n from each of the 9 real queries.
    np.testing.assert_allclose(stats.received[0, 0], [1.0] * 9 + [0.0] * 3, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.self_mass[0, 0], [1 / n] * 9 + [0.0] * 3, rtol=1e-6, atol=1e-7)
    # Pooled: bins of 4 positions; key bin 2 holds 1 real key of 4, the others 4 of 4.
    np.testing.assert_allclose(stats.pooled[0, 0], [[1 / n, 1 / n, 1 / (4 * n)]] * 3, rtol=1e-6)
    expected_out = jnp.mean(v[:, :n], axis=1, keepdims=True)  # (B, 1, N, H)
    np.testing.assert_allclose(out, jnp.broadcast_to(expected_out, out.shape), rtol=1e-5, atol=1e-6)


def test_causal_first_query_sees_only_key_zero():
    q, k, v, _ = make_inputs(1, 2, 10, 2, 8, padding="none")
    out, stats = reference_attention(q, k, v, causal=True, stats=True)
    # Query 0 has one visible key: p = 1 there, entropy 0, and self = first = 1.
    np.testing.assert_allclose(stats.entropy[..., 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(stats.max_prob[..., 0], 1.0)
    np.testing.assert_allclose(stats.first_mass[..., 0], 1.0)
    np.testing.assert_allclose(stats.self_mass[..., 0], 1.0)
    np.testing.assert_array_equal(stats.prev_mass[..., 0], 0.0)
    np.testing.assert_array_equal(stats.argmax[..., 0], 0)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)
    # Query 1 sees keys 0 and 1 only.
    np.testing.assert_allclose(stats.first_mass[..., 1] + stats.self_mass[..., 1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats.prev_mass[..., 1], stats.first_mass[..., 1])


def test_reference_weights_zero_at_masked_keys_and_match_jax():
    q, k, v, mask = make_inputs(2, 2, 16, 2, 8, padding="full_row")
    scores, probs = reference_attention_weights(q, k, mask, False)
    hidden = ~np.asarray(mask)[:, None, None, :]  # (B, 1, 1, T)
    hidden = np.broadcast_to(hidden, probs.shape)
    assert np.all(np.asarray(probs)[hidden] == 0.0)
    assert np.all(np.asarray(scores)[hidden] == MASK_VALUE)
    row_sums = np.asarray(probs.sum(-1))
    np.testing.assert_allclose(row_sums[0], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(row_sums[1], 0.0)  # batch 1 is all padding: zero rows
    out = reference_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(out[1], 0.0)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPU
        expected = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    np.testing.assert_allclose(out[0], expected[0], rtol=1e-5, atol=1e-5)


def test_reference_causal_matches_jax():
    q, k, v, _ = make_inputs(3, 2, 20, 2, 16, padding="none")
    out = reference_attention(q, k, v, causal=True, scale=0.3)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPU
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- blockwise sweep

BLOCKWISE_CASES = [
    # (length, head_dim, causal, padding, pool)
    (37, 32, False, "random", 5),
    (37, 32, True, "random", None),
    (100, 64, False, "full_row", 7),
    (100, 64, True, "full_row", 4),
    (130, 128, False, "none", None),
    (130, 128, True, "random", 9),
    (1, 32, True, "none", 1),
    (6, 32, False, "random", 8),  # more bins than positions: empty bins are 0
]


@pytest.mark.parametrize("length,head_dim,causal,padding,pool", BLOCKWISE_CASES)
def test_blockwise_float32_matches_reference(length, head_dim, causal, padding, pool):
    q, k, v, mask = make_inputs(length + head_dim, 2, length, 3, head_dim, padding=padding, causal=causal)
    check_against_reference(blockwise, q, k, v, mask, causal=causal, pool=pool,
                            out_tol=F32_TOL, stats_tol=F32_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_float64_matches_reference_tightly(causal):
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(7, 2, 45, 2, 32, dtype=jnp.float64, padding="full_row", causal=causal)
        check_against_reference(blockwise, q, k, v, mask, causal=causal, pool=6,
                                out_tol=F64_TOL, stats_tol=F64_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_bfloat16_matches_reference(causal):
    q, k, v, mask = make_inputs(8, 2, 70, 2, 64, dtype=jnp.bfloat16, padding="full_row", causal=causal)
    check_against_reference(blockwise, q, k, v, mask, causal=causal, pool=5,
                            out_tol=BF16_OUT_TOL, stats_tol=BF16_STATS_TOL)


def test_blockwise_default_tiles_single_and_many_blocks():
    # Default tiles (512) cover the whole sequence in one block; 8-row tiles need many;
    # block_heads=2 walks both heads of a sequence in one step.
    q, k, v, mask = make_inputs(9, 2, 50, 2, 32, padding="random")
    for tiles in (None, BlockwiseBlockSizes(8, 8), BlockwiseBlockSizes(16, 8, block_heads=2)):
        fn = functools.partial(blockwise_attention, block_sizes=tiles)
        check_against_reference(fn, q, k, v, mask, causal=True, pool=3, out_tol=F32_TOL, stats_tol=F32_TOL)


@pytest.mark.parametrize("impl", ["blockwise"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_default_scale_reaches_the_kernel(impl, causal):
    # scale 0.37 is far from 1/sqrt(32) = 0.177: a kernel that ignored it would be off by O(1).
    q, k, v, mask = make_inputs(31, 2, 45, 2, 32, padding="full_row", causal=causal)
    fn = {"blockwise": blockwise, "pallas": pallas}[impl]
    check_against_reference(fn, q, k, v, mask, causal=causal, pool=4, scale=0.37,
                            out_tol=F32_TOL, stats_tol=F32_TOL)


# --------------------------------------------------------------------------- gradients


def _loss(fn, cotangent, mask, causal):
    def loss(q, k, v):
        out = fn(q, k, v, mask=mask, causal=causal)
        return jnp.sum(out.astype(jnp.float32) * cotangent)
    return loss


GRAD_CASES = [(False, "full_row", 45), (True, "random", 70)]


@pytest.mark.parametrize("impl", ["blockwise"])
@pytest.mark.parametrize("causal,padding,length", GRAD_CASES)
def test_gradients_match_reference(impl, causal, padding, length):
    q, k, v, mask = make_inputs(21, 2, length, 2, 32, padding=padding, causal=causal)
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    fn = {"blockwise": blockwise, "pallas": pallas}[impl]
    grads = jax.grad(_loss(fn, cotangent, mask, causal), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(_loss(reference_attention, cotangent, mask, causal), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        assert np.all(np.isfinite(np.asarray(g))), name
        # Gradients sum T terms of O(1): float32 summation-order noise ~1e-5.
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
    if padding == "full_row":
        # A fully padded sequence has zero output rows, and so zero gradients.
        np.testing.assert_array_equal(grads[0][1], 0.0)


def test_gradient_with_statistics_requested():
    # Asking for statistics does not change the output's gradient; stats carry none.
    q, k, v, mask = make_inputs(22, 1, 40, 2, 16, padding="random")

    def loss(q, stats_too):
        result = blockwise(q, k, v, mask=mask, causal=True, stats=stats_too)
        out = result[0] if stats_too else result
        extra = jnp.sum(result[1].entropy) if stats_too else 0.0
        return jnp.sum(out ** 2) + extra

    np.testing.assert_allclose(jax.grad(loss)(q, True), jax.grad(loss)(q, False), **F32_TOL)


@pytest.mark.parametrize("impl", ["blockwise"])
def test_check_grads_float64(impl):
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(23, 1, 20, 2, 16, dtype=jnp.float64, padding="random")
        fn = {"blockwise": blockwise, "pallas": pallas}[impl]
        check_grads(lambda q, k, v: fn(q, k, v, mask=mask, causal=True), (q, k, v),
                    order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- jit / vmap


@pytest.mark.parametrize("impl", ["blockwise"])
def test_vmap_over_batch_and_heads(impl):
    q, k, v, mask = make_inputs(31, 2, 40, 3, 16, padding="random")
    fn = functools.partial({"blockwise": blockwise, "pallas": pallas}[impl], causal=True, stats=True, pool=4)
    out, stats = jax.jit(lambda q, k, v, m: fn(q, k, v, mask=m))(q, k, v, mask)

    def one_sequence(q, k, v, m):  # (T, N, H) -> per-sequence kernel call
        o, s = fn(q[None], k[None], v[None], mask=m[None])
        return o[0], jax.tree.map(lambda x: x[0], s)

    out_b, stats_b = jax.vmap(one_sequence)(q, k, v, mask)
    np.testing.assert_allclose(out_b, out, **F32_TOL)
    for name in FLOAT_STATS + ["argmax", "pooled"]:
        np.testing.assert_allclose(getattr(stats_b, name), getattr(stats, name), **F32_TOL, err_msg=name)

    def one_head(q, k, v):  # (B, T, H) -> single-head kernel call
        o, s = fn(q[:, :, None], k[:, :, None], v[:, :, None], mask=mask)
        return o[:, :, 0], jax.tree.map(lambda x: x[:, 0], s)

    out_h, stats_h = jax.vmap(one_head, in_axes=2, out_axes=(2, 1))(q, k, v)
    np.testing.assert_allclose(out_h, out, **F32_TOL)
    np.testing.assert_allclose(stats_h.entropy, stats.entropy, **F32_TOL)
    np.testing.assert_allclose(stats_h.received, stats.received, **F32_TOL)


# --------------------------------------------------------------------------- dispatch and errors


def test_attention_dispatch_agrees_across_impls():
    q, k, v, mask = make_inputs(41, 2, 24, 2, 16, padding="random")
    expected = reference_attention(q, k, v, mask=mask, causal=True)
    for impl in ("auto", "reference", "blockwise", "pallas"):
        out = attention(q, k, v, mask=mask, causal=True, impl=impl)
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5, err_msg=impl)
    out, stats = attention(q, k, v, mask=mask.astype(jnp.int32), stats=True, pool=2)
    assert isinstance(stats, AttentionStats) and stats.pooled.shape == (2, 2, 2, 2)
    assert stats.lse.dtype == jnp.float32


def test_auto_picks_blockwise_on_cpu_and_pallas_on_accelerators():
    expected = "blockwise" if ON_CPU else "pallas"
    assert kernels.resolve_impl("auto") == expected
    # On an accelerator this compiles every Pallas kernel (forward, statistics, backward).
    assert kernels.resolve_impl("auto", jnp.float32, 64) == expected


@pytest.mark.skipif(not ON_CPU, reason="simulates a GPU that cannot compile the kernels; a real one can")
def test_auto_falls_back_to_blockwise_when_pallas_cannot_compile(monkeypatch):
    # Pretend to be on a GPU: the Triton kernels cannot compile for the CPU device, as
    # they would not on an unsupported GPU; "auto" must warn and still give the answer.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kernels.pallas_compiles.cache_clear()
    q, k, v, mask = make_inputs(51, 1, 20, 2, 8, padding="random")
    try:
        with pytest.warns(RuntimeWarning, match="do not compile on this gpu.*uses the XLA blockwise"):
            assert kernels.resolve_impl("auto", jnp.float32, 8) == "blockwise"
        out = attention(q, k, v, mask=mask, causal=True)  # checked once: no second warning needed
    finally:
        kernels.pallas_compiles.cache_clear()
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask, causal=True), **F32_TOL)


def test_custom_attention_function():
    q, k, v, mask = make_inputs(42, 1, 8, 2, 8, padding="random")
    calls = []

    def custom(q, k, v, *, mask, causal, scale):
        calls.append((mask is not None, causal, scale))
        return reference_attention(q, k, v, mask=mask, causal=causal, scale=scale)

    out = attention(q, k, v, mask=mask, causal=True, scale=0.5, impl=custom)
    assert calls == [(True, True, 0.5)]
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask, causal=True, scale=0.5))
    with pytest.raises(ValueError, match="custom attention functions cannot produce stats"):
        attention(q, k, v, stats=True, impl=custom)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(impl="flash"), ValueError, r"'auto', 'reference', 'blockwise', 'pallas'"),
    (dict(k=np.zeros((1, 8, 2, 4), np.float32)), ValueError, r"k has shape \(1, 8, 2, 4\); expected .*\(1, 8, 2, 8\)"),
    (dict(v=np.zeros((1, 9, 2, 8), np.float32)), ValueError, r"v has shape"),
    (dict(q=np.zeros((8, 2, 8), np.float32)), ValueError, r"q has shape \(8, 2, 8\); expected 4 axes"),
    (dict(mask=np.ones((1, 9), bool)), ValueError, r"mask has shape \(1, 9\); expected \(batch, key_seq\) = \(1, 8\)"),
    (dict(mask=np.ones((1, 8), np.float32)), TypeError, r"mask has dtype float32"),
    (dict(k=np.zeros((1, 8, 2, 8), np.float16)), TypeError, r"k has dtype float16 but q has float32"),
    (dict(pool=0, stats=True), ValueError, r"pool=0"),
    (dict(pool=4), ValueError, r"needs stats=True"),
])
def test_attention_rejects_bad_requests(kwargs, error, match):
    args = dict(q=np.zeros((1, 8, 2, 8), np.float32), k=np.zeros((1, 8, 2, 8), np.float32),
                v=np.zeros((1, 8, 2, 8), np.float32))
    for name in "qkv":
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(error, match=match):
        attention(args["q"], args["k"], args["v"], **kwargs)


def test_traced_scale_is_rejected():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(TypeError, match="scale"):
        jax.jit(lambda q, s: attention(q, q, q, scale=s))(q, 0.5)


@pytest.mark.parametrize("flag", ["causal", "stats"])
def test_traced_flags_are_rejected(flag):
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(TypeError, match=f"attention\\({flag}=...\\) must be a Python bool"):
        jax.jit(lambda q, value: attention(q, q, q, **{flag: value}))(q, True)


@pytest.mark.parametrize("shape,axis", [((0, 4, 2, 8), "batch"), ((1, 0, 2, 8), "seq"),
                                        ((1, 4, 0, 8), "heads"), ((1, 4, 2, 0), "head_dim")])
@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas"])
def test_empty_axes_are_clear_errors(shape, axis, impl):
    q = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=f"an empty {axis} axis"):
        attention(q, q, q, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas"])
def test_statistics_carry_no_gradient_under_every_impl(impl):
    # The kernels' VJPs cover the output only; the reference path matches them, so
    # switching impl never changes a gradient.
    q, k, v, mask = make_inputs(41, 1, 20, 2, 8, padding="random")

    def entropy_sum(q):
        return jnp.sum(attention(q, k, v, mask=mask, stats=True, impl=impl)[1].entropy)

    np.testing.assert_array_equal(jax.grad(entropy_sum)(q), 0.0)
