"""attnjax.kernels.pallas_*: the Pallas kernels against the dense reference.

Where they run:
- on CPU, in the Pallas interpreter (backend "interpret"): slow, so the cases are
  small and each one combines several features (GQA, windows, soft caps, padding);
- on a GPU (benchmarks/gpu_check.sh), the same tests compile the kernels with Triton
  (the default backend there), and the ``test_compiled_*`` tests add model-sized
  shapes the interpreter cannot afford;
- everywhere, the lowering tests generate Triton (CUDA) and Mosaic (TPU) IR for every
  kernel, which catches operations and block shapes the backends do not support.

Tiles are small (block_q 32, block_k 16) so that every sequence spans several blocks
and ends in a partial one, and windows are both narrower and wider than a tile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnjax.kernels import AttentionStats, reference_attention, reference_attention_weights
from attnjax.kernels.pallas_attention import BlockSizes, default_backend, pallas_attention, pallas_core
from attnjax.kernels.spec import normalize
from tests.test_kernels import make_inputs as kernel_inputs

BACKEND = default_backend()  # "interpret" on CPU, "triton" on GPU, "mosaic" on TPU
INTERPRETED = BACKEND == "interpret"
ON_GPU = jax.default_backend() == "gpu"
FLOAT_STATS = [name for name in AttentionStats.PER_QUERY if name != "argmax"] + ["received"]

# Mosaic tiles are multiples of 128; elsewhere small tiles make several blocks per sequence.
TILES = None if BACKEND == "mosaic" else BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)

# float32: both sides accumulate in float32 with full-precision matmuls; differences
# are summation order only (mean_distance and received reach ~T, hence rtol).
F32_TOL = dict(rtol=2e-5, atol=2e-5)
F64_TOL = dict(rtol=1e-11, atol=1e-11)
# bfloat16: the reference upcasts to float32; the kernel rounds the output to bf16
# (2^-8 relative) and p to bf16 before p @ v (FlashAttention practice). Scores
# accumulate in float32 from exact bf16 products, so the statistics stay close.
BF16_OUT_TOL = dict(rtol=2e-2, atol=2e-2)
BF16_STATS_TOL = dict(rtol=1e-3, atol=1e-3)
# Gradients sum T terms of O(1): float32 summation-order noise ~1e-5.
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)

pallas = functools.partial(pallas_attention, block_sizes=TILES)
# Jitted: the eager reference dispatches its statistics op by op, several times slower.
reference = jax.jit(reference_attention, static_argnames=("causal", "scale", "window", "softcap", "stats", "pool"))
reference_weights = jax.jit(reference_attention_weights, static_argnames=("causal", "scale", "window", "softcap"))


def make_inputs(seed, batch, length, heads, kv_heads, head_dim, dtype=jnp.float32, padding="random"):
    """tests.test_kernels.make_inputs with the kv heads given, and "full_row" padding
    always left-padding batch element 0 too (its first causal rows then see no key)."""
    return kernel_inputs(seed, batch, length, heads, head_dim, dtype, padding, causal=True, kv_heads=kv_heads)


def assert_stats_close(stats, expected, probs, tol):
    """Every statistic; argmax through the probability it points at (ties may differ)."""
    for name in FLOAT_STATS:
        got, want = getattr(stats, name), getattr(expected, name)
        assert got.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), err_msg=name, **tol)
    assert stats.argmax.dtype == jnp.int32
    picked = np.take_along_axis(np.asarray(probs, np.float64), np.asarray(stats.argmax)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(picked, np.asarray(expected.max_prob, np.float64), err_msg="argmax", **tol)
    assert np.mean(np.asarray(stats.argmax) == np.asarray(expected.argmax)) > 0.99
    if expected.pooled is None:
        assert stats.pooled is None
    else:
        np.testing.assert_allclose(np.asarray(stats.pooled, np.float64), np.asarray(expected.pooled, np.float64),
                                   err_msg="pooled", **tol)
    for name in AttentionStats.PER_QUERY + ("received",):
        assert np.all(np.isfinite(np.asarray(getattr(stats, name)))), name


def check_against_reference(fn, q, k, v, mask, out_tol, stats_tol, check_plain=False, **options):
    """fn's output and statistics against reference_attention with the same options;
    with ``check_plain``, the output without statistics too (another compile, so only
    in a few cases)."""
    out, stats = fn(q, k, v, mask=mask, stats=True, **options)
    out_ref, stats_ref = reference(q, k, v, mask=mask, stats=True, **options)
    weights_options = {name: options.get(name) for name in ("window", "softcap")}
    _, probs = reference_weights(q, k, mask, options.get("causal", False), options.get("scale"),
                                 **weights_options)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(out_ref, np.float64), err_msg="out", **out_tol)
    assert_stats_close(stats, stats_ref, probs, stats_tol)
    if check_plain:
        options.pop("pool", None)
        plain = fn(q, k, v, mask=mask, **options)  # a separately compiled kernel: equal up to rounding
        np.testing.assert_allclose(np.asarray(plain, np.float64), np.asarray(out, np.float64), **out_tol)


# --------------------------------------------------------------------------- forward and statistics

CASES = {
    # id: (length, heads, kv_heads, head_dim, dtype, padding, options)
    "gqa4/2-causal": (45, 4, 2, 16, jnp.float32, "random", dict(causal=True, pool=5)),
    "mqa4/1-window8": (70, 4, 1, 32, jnp.float32, "full_row", dict(causal=True, window=8, pool=6)),
    "gqa4/2-window40-softcap": (77, 4, 2, 32, jnp.float32, "random", dict(causal=True, window=40, softcap=5.0, pool=4)),
    "mha-bidirectional-softcap-scale": (50, 2, 2, 64, jnp.float32, "full_row", dict(softcap=3.0, scale=0.37, pool=7)),
    "window1-no-mask": (20, 2, 2, 16, jnp.float32, "none", dict(causal=True, window=1, pool=2)),
    "bf16-gqa4/2-window20-softcap": (64, 4, 2, 64, jnp.bfloat16, "full_row", dict(causal=True, window=20, softcap=10.0, pool=3)),
}


PLAIN_TOO = ("gqa4/2-causal",)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    # Lengths no tile divides; windows narrower (8, 1) and wider (20, 40) than a key
    # tile of 16; GQA with 2 and MQA with 4 query heads per kv head; rows with no
    # visible key ("full_row"); bf16 with float32 statistics.
    length, heads, kv_heads, head_dim, dtype, padding, options = CASES[case]
    q, k, v, mask = make_inputs(length + head_dim, 2, length, heads, kv_heads, head_dim, dtype, padding)
    bf16 = dtype == jnp.bfloat16
    check_against_reference(pallas, q, k, v, mask, BF16_OUT_TOL if bf16 else F32_TOL,
                            BF16_STATS_TOL if bf16 else F32_TOL, check_plain=case in PLAIN_TOO, **options)


def test_default_tiles_bf16_mqa_without_mask():
    # Default tiles (128 x 64 on Triton and the interpreter) clipped to a short
    # sequence; multi-query bf16 with mask=None (sequence padding masked by position).
    q, k, v, _ = make_inputs(12, 1, 90, 2, 1, 32, jnp.bfloat16, "none")
    check_against_reference(pallas_attention, q, k, v, None, BF16_OUT_TOL, BF16_STATS_TOL,
                            check_plain=True, pool=3)


@pytest.mark.skipif(not INTERPRETED, reason="float64 Pallas runs only in the interpreter")
def test_float64_matches_reference_tightly():
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(11, 2, 40, 4, 2, 16, jnp.float64, "full_row")
        check_against_reference(pallas, q, k, v, mask, F64_TOL, F64_TOL,
                                causal=True, window=24, softcap=4.0, pool=3)


def test_window_skips_key_and_query_blocks_outside_the_band():
    # NaN in v at keys 0..15 (key block 0) reaches every output row whose program
    # visits that block (p = 0 times NaN is NaN), masked or not. With window 8 the
    # query blocks from 32 on must skip it. NaN in q at queries 64.. likewise reaches
    # dk, dv and received of every key block whose programs visit those query blocks:
    # keys 0..15 see queries up to 22 only.
    length, bk = 128, TILES.block_k if TILES else 128
    if bk != 16:
        pytest.skip("the block arithmetic below assumes 16-key tiles")
    q, k, v, _ = make_inputs(3, 1, length, 2, 1, 16, padding="none")
    q = q.at[:, 64:].set(jnp.nan)
    options = dict(causal=True, window=8, block_sizes=TILES)
    out, stats = pallas_attention(q, k, v.at[:, :16].set(jnp.nan), stats=True, **options)
    assert np.all(np.isfinite(np.asarray(out[:, 32:64])))
    assert np.all(np.isfinite(np.asarray(stats.received[:, :, :16])))
    assert np.isnan(np.asarray(out[:, :32])).all()  # the poison is real where the block is visited

    def loss(k, v):  # the rows from 64 on get a zero cotangent but still a NaN delta
        return jnp.sum(pallas_attention(q, k, v, **options)[:, :64])

    dk, dv = jax.grad(loss, argnums=(0, 1))(k, v)
    assert np.all(np.isfinite(np.asarray(dk[:, :16]))) and np.all(np.isfinite(np.asarray(dv[:, :16])))
    assert np.isnan(np.asarray(dk[:, 64:])).all()


def test_vmap_over_batch():
    # vmap prepends a grid axis to every pallas_call; the kernels read only their own
    # program ids, so a vmapped per-sequence call equals the reference on the batch.
    q, k, v, mask = make_inputs(31, 2, 24, 2, 1, 16)
    options = dict(causal=True, window=12, softcap=6.0, stats=True, pool=3)
    out, stats = reference(q, k, v, mask=mask, **options)

    def one_sequence(q, k, v, m):  # (T, N, H) -> one kernel call per sequence
        o, s = pallas(q[None], k[None], v[None], mask=m[None], **options)
        return o[0], jax.tree.map(lambda x: x[0], s)

    out_b, stats_b = jax.vmap(one_sequence)(q, k, v, mask)
    np.testing.assert_allclose(out_b, out, **F32_TOL)
    for name in FLOAT_STATS + ["argmax", "pooled"]:
        np.testing.assert_allclose(getattr(stats_b, name), getattr(stats, name), err_msg=name, **F32_TOL)


# --------------------------------------------------------------------------- gradients

GRAD_CASES = {
    "gqa4/2-window12-softcap": (45, 4, 2, 16, "random", dict(causal=True, window=12, softcap=4.0)),
    "mqa4/1-bidirectional-softcap": (40, 4, 1, 32, "full_row", dict(softcap=2.0)),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_match_reference(case):
    length, heads, kv_heads, head_dim, padding, options = GRAD_CASES[case]
    q, k, v, mask = make_inputs(21, 2, length, heads, kv_heads, head_dim, padding=padding)
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask, **options) * cotangent)

    grads = jax.grad(loss(pallas), argnums=(0, 1, 2))(q, k, v)
    expected = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    for name, got, want in zip("qkv", grads, expected):
        assert got.shape == want.shape, name  # dk, dv per kv head: (B, T, Hkv, D)
        assert np.all(np.isfinite(np.asarray(got))), name
        np.testing.assert_allclose(got, want, err_msg=f"d{name}", **GRAD_TOL)
    if padding == "full_row":
        np.testing.assert_array_equal(grads[0][1], 0.0)  # rows with no visible key: zero output and gradient


@pytest.mark.skipif(not INTERPRETED, reason="float64 Pallas runs only in the interpreter")
def test_check_grads_float64():
    with jax.enable_x64(True):
        q, k, v, _ = make_inputs(23, 1, 20, 4, 2, 16, jnp.float64, "none")
        check_grads(lambda q, k, v: pallas(q, k, v, causal=True, window=6, softcap=3.0),
                    (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- entry point


def test_pallas_core_takes_the_normalised_call():
    q, k, v, mask = make_inputs(5, 1, 16, 2, 1, 16)
    norm_mask, spec = normalize(q, k, v, mask=mask, causal=True, window=5, softcap=2.0)
    assert spec.groups == 2
    np.testing.assert_array_equal(
        pallas_core(q, k, v, norm_mask, spec, block_sizes=TILES),
        pallas(q, k, v, mask=mask, causal=True, window=5, softcap=2.0))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=4), ValueError, r"window=4\) needs causal=True"),
    (dict(kv_heads=4), ValueError, r"multiple of the kv heads"),
    (dict(backend="cuda"), ValueError, r"backend='cuda'"),
    (dict(block_sizes=BlockSizes(block_q=24)), ValueError, r"powers of 2"),
])
def test_rejects_bad_requests(kwargs, error, match):
    kv_heads = kwargs.pop("kv_heads", 2)
    q = jnp.zeros((1, 16, 6, 16))
    kv = jnp.zeros((1, 16, kv_heads, 16))
    with pytest.raises(error, match=match):
        pallas_attention(q, kv, kv, **kwargs)


def test_mosaic_tiles_must_be_multiples_of_128():
    q = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(ValueError, match="multiples of 128"):
        jax.jit(lambda q: pallas_attention(q, q, q, block_sizes=BlockSizes(block_q=64),
                                           backend="mosaic")).trace(q)


# --------------------------------------------------------------------------- lowering for GPU and TPU

LOWERING_CASES = {
    # GQA with 3 query heads per kv head (not a power of 2), a padded length, a key
    # mask, a window and a soft cap: every optional path of every kernel.
    "gqa6/2-window-softcap-mask": (200, 6, 2, dict(causal=True, window=100, softcap=30.0), True),
    # The benchmarks' path: no mask, tile-aligned, no causality (no visibility select).
    "mha-no-mask-aligned": (256, 2, 2, dict(), False),
}


@pytest.mark.parametrize("case", list(LOWERING_CASES))
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_for_gpu_and_tpu(case, backend, platform, dtype):
    # Lowering runs the Triton / Mosaic code generators for every kernel (forward with
    # stats, columns with the pooled map, forward without stats, dq, dk/dv).
    length, heads, kv_heads, options, with_mask = LOWERING_CASES[case]
    q = jnp.zeros((2, length, heads, 64), dtype)
    kv = jnp.zeros((2, length, kv_heads, 64), dtype)
    mask = jnp.ones((2, length), bool) if with_mask else None
    fn = functools.partial(pallas_attention, mask=mask, backend=backend, **options)

    def forward_and_grad(q, k, v):
        out, stats = fn(q, k, v, stats=True, pool=7)
        grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
        return out, stats, grads

    text = jax.jit(forward_and_grad).trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()
    target = "xla.gpu.triton" if backend == "triton" else "tpu_custom_call"
    assert text.count(target) >= 5


# --------------------------------------------------------------------------- compiled on a GPU only

COMPILED_CASES = {
    # (length, heads, kv_heads, head_dim, dtype, options)
    "bf16-d64-gqa8/2-window256-softcap": (1000, 8, 2, 64, jnp.bfloat16, dict(causal=True, window=256, softcap=50.0)),
    "bf16-d128-causal": (1024, 4, 4, 128, jnp.bfloat16, dict(causal=True)),
    "f32-d96-mqa4/1-bidirectional": (700, 4, 1, 96, jnp.float32, dict()),
}


@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes: compiled Triton kernels only (gpu_check.sh)")
@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_at_model_sizes(case):
    # Default tiles (128 x 64) and launch settings at realistic lengths and head sizes.
    length, heads, kv_heads, head_dim, dtype, options = COMPILED_CASES[case]
    q, k, v, mask = make_inputs(7, 2, length, heads, kv_heads, head_dim, dtype)
    bf16 = dtype == jnp.bfloat16
    check_against_reference(pallas_attention, q, k, v, mask, BF16_OUT_TOL if bf16 else F32_TOL,
                            BF16_STATS_TOL if bf16 else F32_TOL, pool=16, **options)
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask, **options).astype(jnp.float32) * cotangent)

    grads = jax.grad(loss(pallas_attention), argnums=(0, 1, 2))(q, k, v)
    expected = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    for name, got, want in zip("qkv", grads, expected):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        # bf16 gradients round dS and p to bf16 before the matmuls: compare relative
        # to the gradient's scale.
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(got / scale, want / scale, atol=3e-2 if bf16 else 1e-4, err_msg=f"d{name}")
