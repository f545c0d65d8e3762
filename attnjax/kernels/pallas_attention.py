"""Pallas attention kernels with streaming statistics (GPU via Triton, TPU via Mosaic).

Three kinds of kernel, each one program per (query or key block, batch, head), with
the loop over the other sequence axis inside the kernel (as JAX's
``ops/gpu/attention.py`` does: the Triton backend has no scratch memory, so the
whole K/V of a head is the block and ``lax.fori_loop`` walks it):

1. forward (grid: query blocks x B x N): online softmax (FlashAttention-2) giving the
   output and the natural-log LSE; with ``stats`` also the row statistics in the
   same pass, rescaled like the normaliser (definitions in ``blockwise.py``):
   entropy from ``E = sum exp(s - m)(s - m)``, max_prob = 1 / l, the first argmax,
   and the mean distance;
2. columns (grid: key blocks x B x N): recomputes ``p = exp(s - lse)`` from the saved
   LSE, query block by query block, for ``received`` (column sums over non-padding
   queries) and, with ``pool``, the row-bin sums behind the pooled map (one matmul
   of a one-hot bin matrix with p);
3. backward, through ``jax.custom_vjp``: a dq kernel (grid over query blocks) and a
   dk/dv kernel (grid over key blocks), both recomputing p from the LSE, with
   ``dS = P * (dP - rowsum(dO * O))``.

``first_mass``, ``self_mass`` and ``prev_mass`` are read after the forward from the
LSE (``blockwise.diagonal_masses``, O(T H)); the statistics carry no gradient.

Backends: ``"triton"`` (GPU; Triton CompilerParams; power-of-2 blocks, head_dim
zero-padded to a power of 2), ``"mosaic"`` (TPU; blocks multiples of 128, grid axes
all parallel), ``"interpret"`` (any backend, ``pallas_call(interpret=True)``: the
same kernels run by the Pallas interpreter, slow, for tests on CPU). Sequences are
zero-padded to a multiple of the blocks and the padding masked.

float32 inputs use full float32 matmuls (no TF32); bf16/f16 inputs multiply in their
own dtype with float32 accumulation (p is cast to v's dtype for p @ v, as in
FlashAttention). Statistics accumulate in float32 (float64 for float64 inputs, which
only the interpreter runs).

What is verified where: the interpreter runs these kernels against the reference
in tests/test_kernels.py on CPU; the same tests compile them with Triton when a GPU
is present. On any machine the tests also lower every kernel for CUDA (Triton IR)
and TPU (Mosaic), which catches unsupported operations and block shapes, but not
what only the backend compilers check (register or VMEM budgets, Mosaic layouts).
On TPU one head's whole K and V are VMEM blocks (double-buffered, 4 T D itemsize
bytes), which bounds T under the default scoped-VMEM limit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.kernels.blockwise import (
    M_INIT,
    assemble_stats,
    heads_major,
    padded_bin_one_hot,
    padded_key_mask,
    padded_query_weight,
    round_up,
)
from attnjax.kernels.reference import (
    MASK_VALUE,
    accumulation_dtype,
    default_scale,
    matmul_precision,
)

BACKENDS = ("triton", "mosaic", "interpret")
_NO_INDEX = jnp.iinfo(jnp.int32).max
_MIN_TRITON_DIM = 16     # tl.dot needs every matmul dimension >= 16
_TPU_LANES = 128         # Mosaic: lane-dim blocks are multiples of 128
_TPU_SUBLANES = 8


def _triton_compiler_params():
    """The Triton CompilerParams class: ``pallas.triton.CompilerParams`` (JAX 0.6+,
    deprecated with the whole Triton backend in 0.11) or the older
    ``pallas.TritonCompilerParams``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from jax.experimental.pallas import triton as pl_triton
            params = getattr(pl_triton, "CompilerParams", None)
        except ImportError:  # pragma: no cover - very old JAX
            params = None
        if params is None:
            params = getattr(pl, "TritonCompilerParams", None)
    if params is None:  # pragma: no cover
        raise RuntimeError(
            "This JAX has no Pallas Triton CompilerParams; use impl='blockwise' on GPU.")
    return params


def _mosaic_compiler_params():
    from jax.experimental.pallas import tpu as pl_tpu
    params = getattr(pl_tpu, "CompilerParams", None) or getattr(pl_tpu, "TPUCompilerParams")
    return params


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch settings of the Pallas kernels.

    block_q / block_k:         forward and column-pass tiles (queries, keys);
    block_q_bwd / block_k_bwd: backward tiles (dq kernel: block_q_bwd queries per
                               program; dk/dv kernel: block_k_bwd keys per program);
    num_warps / num_stages:    Triton launch settings (None: 4 warps for head_dim <= 64,
                               else 8). Ignored by Mosaic and the interpreter.
    Triton needs powers of 2 (>= 16); Mosaic needs multiples of 128. The defaults
    follow JAX's own Pallas attention ops and have not been tuned for the
    statistics kernels.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: Optional[int] = None
    num_stages: int = 2

    @classmethod
    def for_backend(cls, backend: str) -> "BlockSizes":
        if backend == "mosaic":
            return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
        return cls()

    @property
    def tiles(self):
        return (self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: a custom_vjp nondiff arg)."""

    scale: float
    causal: bool
    length: int          # real sequence length T
    stats: bool
    backend: str
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int


def default_backend() -> str:
    """The Pallas backend for JAX's default device: triton (GPU), mosaic (TPU), else interpret."""
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic"
    return "interpret"


def _fit_blocks(sizes: BlockSizes, backend: str, length: int) -> BlockSizes:
    """Clip the tiles to the sequence and check them against the backend's rules."""
    if backend == "mosaic":
        for name, value in zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"), sizes.tiles):
            if value % _TPU_LANES:
                raise ValueError(
                    f"BlockSizes.{name}={value}: Mosaic (TPU) tiles must be multiples of {_TPU_LANES}.")
        cap = round_up(length, _TPU_LANES)
    else:
        for name, value in zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"), sizes.tiles):
            if value < _MIN_TRITON_DIM or value & (value - 1):
                raise ValueError(
                    f"BlockSizes.{name}={value}: Triton tiles must be powers of 2 and at least "
                    f"{_MIN_TRITON_DIM}.")
        cap = max(_MIN_TRITON_DIM, pl.next_power_of_2(length))
    return dataclasses.replace(
        sizes,
        block_q=min(sizes.block_q, cap), block_k=min(sizes.block_k, cap),
        block_q_bwd=min(sizes.block_q_bwd, cap), block_k_bwd=min(sizes.block_k_bwd, cap),
    )


def _pallas_call(kernel, cfg: _Config, *, grid, in_specs, out_specs, out_shape, name):
    if cfg.backend == "triton":
        params = _triton_compiler_params()(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif cfg.backend == "mosaic":
        params = _mosaic_compiler_params()(dimension_semantics=("parallel",) * len(grid))
    else:
        params = None
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=cfg.backend == "interpret", name=name,
    )


def _dot(a, b, contract, acc_dtype, precision):
    """2-D matmul contracting a's axis contract[0] with b's axis contract[1]."""
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())),
        precision=precision, preferred_element_type=acc_dtype,
    )


def _div(numerator, denominator: int):
    """Integer division of a traced int32 program index (``//`` and pl.cdiv do not
    lower for program ids on every backend; int32 under x64 too)."""
    return lax.div(numerator, jnp.int32(denominator))


def _visible(key_vis, key_pos, query_pos, causal: bool):
    """(rows, bk) or (1, bk) bool: key visibility from the key mask and causality."""
    if causal:
        return key_vis & (key_pos <= query_pos)  # (bq, bk)
    return key_vis  # (1, bk)


# --------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, kmask_ref, o_ref, lse_ref, *stat_refs, cfg: _Config,
                    num_key_blocks: int):
    bq, bk = cfg.block_q, cfg.block_k
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    iq = pl.program_id(0)
    q = q_ref[...]  # (bq, Dp)
    query_pos = iq * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)

    def body(j, carry):
        m, l, o, entropy_sum, distance_sum, argmax = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # (bk, Dp)
        v = v_ref[pl.ds(start, bk), :]  # (bk, Dp)
        key_vis = kmask_ref[:, pl.ds(start, bk)] != 0  # (1, bk)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)
        visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (bq, bk) or (1, bk)
        s = _dot(q, k, (1, 1), acc, precision) * cfg.scale  # (bq, bk)
        s = jnp.where(visible, s, MASK_VALUE)  # (bq, bk)
        m_blk = jnp.max(s, axis=1, keepdims=True)  # (bq, 1)
        m_new = jnp.maximum(m, m_blk)  # (bq, 1)
        correction = jnp.exp(m - m_new)  # (bq, 1)
        shifted = s - m_new  # (bq, bk)
        p = jnp.exp(shifted)  # (bq, bk); exactly 0 at invisible keys (m_new >= M_INIT)
        l_new = correction * l + jnp.sum(p, axis=1, keepdims=True)  # (bq, 1)
        o_new = correction * o + _dot(p.astype(v.dtype), v, (1, 0), acc, precision)  # (bq, Dp)
        if cfg.stats:
            entropy_sum = (correction * (entropy_sum + (m - m_new) * l)
                           + jnp.sum(p * shifted, axis=1, keepdims=True))  # (bq, 1)
            distance = jnp.abs((query_pos - key_pos).astype(acc))  # (bq, bk)
            distance_sum = correction * distance_sum + jnp.sum(p * distance, axis=1, keepdims=True)  # (bq, 1)
            is_max = s == m_blk  # (bq, bk); a masked score only ties when m_blk = MASK_VALUE < m
            first_max = jnp.min(jnp.where(is_max, key_pos, _NO_INDEX), axis=1, keepdims=True)  # (bq, 1)
            argmax = jnp.where(m_blk > m, first_max, argmax)  # (bq, 1)
        return m_new, l_new, o_new, entropy_sum, distance_sum, argmax

    row_zeros = jnp.zeros((bq, 1), acc)  # (bq, 1)
    init = (
        jnp.full((bq, 1), M_INIT, acc), row_zeros, jnp.zeros(o_ref.shape, acc),
        row_zeros, row_zeros, jnp.zeros((bq, 1), jnp.int32),
    )
    if cfg.causal:
        upper = jnp.minimum(_div((iq + 1) * bq + bk - 1, bk), num_key_blocks)
    else:
        upper = num_key_blocks
    m, l, o, entropy_sum, distance_sum, argmax = lax.fori_loop(0, upper, body, init)

    valid = l > 0  # (bq, 1); False for a query with no visible key
    l_safe = jnp.where(valid, l, 1.0)  # (bq, 1)
    log_l = jnp.log(l_safe)  # (bq, 1)
    o_ref[...] = (o / l_safe).astype(o_ref.dtype)  # (bq, Dp)
    lse_ref[...] = jnp.where(valid, m + log_l, 0.0).astype(lse_ref.dtype)  # (bq, 1)
    if cfg.stats:
        entropy_ref, max_prob_ref, argmax_ref, distance_ref = stat_refs
        entropy_ref[...] = jnp.where(valid, log_l - entropy_sum / l_safe, 0.0).astype(entropy_ref.dtype)
        max_prob_ref[...] = jnp.where(valid, 1.0 / l_safe, 0.0).astype(max_prob_ref.dtype)
        argmax_ref[...] = argmax
        distance_ref[...] = (distance_sum / l_safe).astype(distance_ref.dtype)


def _forward(q, k, v, kmask, cfg: _Config):
    """q, k, v: (B, N, Tp, Dp); kmask: (B, 1, Tp) int32.

    Returns out (B, N, Tp, Dp) and per-query rows (B, N, Tp, 1): (lse,) or, with
    stats, (lse, entropy, max_prob, argmax, mean_distance).
    """
    batch, heads, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    bq = cfg.block_q
    grid = (padded // bq, batch, heads)
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))
    row_shape = jax.ShapeDtypeStruct((batch, heads, padded, 1), acc)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), row_shape]
    out_specs = [pl.BlockSpec((None, None, bq, head_dim), lambda i, b, h: (b, h, i, 0)), row_spec]
    if cfg.stats:
        out_shape += [row_shape, row_shape,
                      jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.int32), row_shape]
        out_specs += [row_spec] * 4
    whole = pl.BlockSpec((None, None, padded, head_dim), lambda i, b, h: (b, h, 0, 0))
    kernel = functools.partial(_forward_kernel, cfg=cfg,
                               num_key_blocks=-(-cfg.length // cfg.block_k))
    out, *rows = _pallas_call(
        kernel, cfg, grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, bq, head_dim), lambda i, b, h: (b, h, i, 0)),  # q
            whole, whole,  # k, v
            pl.BlockSpec((None, 1, padded), lambda i, b, h: (b, 0, 0)),  # key mask
        ],
        out_specs=out_specs, out_shape=out_shape, name="attnjax_forward",
    )(q, k, v, kmask)
    return out, tuple(r[..., 0] for r in rows)  # rows (B, N, Tp) each


# --------------------------------------------------------------------------- columns


def _columns_kernel(q_ref, k_ref, lse_ref, kmask_ref, weight_ref, *refs, cfg: _Config,
                    num_query_blocks: int, pooled: bool):
    if pooled:
        bins_ref, received_ref, bin_sums_ref = refs
    else:
        bins_ref, bin_sums_ref = None, None
        (received_ref,) = refs
    bq, bk = cfg.block_q, cfg.block_k
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    jk = pl.program_id(0)
    k = k_ref[...]  # (bk, Dp)
    key_vis = kmask_ref[...] != 0  # (1, bk)
    key_pos = jk * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)

    def body(i, carry):
        received, bin_sums = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]  # (bq, Dp)
        lse = lse_ref[pl.ds(start, bq), :]  # (bq, 1)
        weight = weight_ref[pl.ds(start, bq), :]  # (bq, 1)
        query_pos = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)
        visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (bq, bk) or (1, bk)
        s = _dot(q, k, (1, 1), acc, precision) * cfg.scale  # (bq, bk)
        p = jnp.exp(jnp.where(visible, s - lse, MASK_VALUE))  # (bq, bk); exactly 0 if invisible
        received = received + jnp.sum(p * weight, axis=0, keepdims=True)  # (1, bk)
        if pooled:
            bins = bins_ref[:, pl.ds(start, bq)]  # (P', bq)
            bin_sums = bin_sums + _dot(bins, p, (1, 0), acc, lax.Precision.HIGHEST)  # (P', bk)
        return received, bin_sums

    received0 = jnp.zeros((1, bk), acc)  # (1, bk)
    bin_sums0 = jnp.zeros(bin_sums_ref.shape, acc) if pooled else jnp.zeros((1, bk), acc)
    lower = _div(jk * bk, bq) if cfg.causal else 0
    received, bin_sums = lax.fori_loop(lower, num_query_blocks, body, (received0, bin_sums0))
    received_ref[...] = received.astype(received_ref.dtype)
    if pooled:
        bin_sums_ref[...] = bin_sums.astype(bin_sums_ref.dtype)


def _columns(q, k, kmask, query_weight, bins, lse, cfg: _Config):
    """received (B, N, Tp) and row-bin sums (B, N, P', Tp) or None.

    q, k: (B, N, Tp, Dp); kmask: (B, 1, Tp) int32; query_weight: (B, Tp, 1);
    bins: (P', Tp) one-hot bin matrix or None; lse: (B, N, Tp).
    """
    batch, heads, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    bk = cfg.block_k
    grid = (padded // bk, batch, heads)
    in_specs = [
        pl.BlockSpec((None, None, padded, head_dim), lambda j, b, h: (b, h, 0, 0)),  # q
        pl.BlockSpec((None, None, bk, head_dim), lambda j, b, h: (b, h, j, 0)),  # k
        pl.BlockSpec((None, None, padded, 1), lambda j, b, h: (b, h, 0, 0)),  # lse
        pl.BlockSpec((None, 1, bk), lambda j, b, h: (b, 0, j)),  # key mask
        pl.BlockSpec((None, padded, 1), lambda j, b, h: (b, 0, 0)),  # query weight
    ]
    args = [q, k, lse[..., None].astype(acc), kmask, query_weight]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, 1, padded), acc)]
    out_specs = [pl.BlockSpec((None, None, 1, bk), lambda j, b, h: (b, h, 0, j))]
    pooled = bins is not None
    if pooled:
        width = bins.shape[0]
        in_specs.append(pl.BlockSpec((width, padded), lambda j, b, h: (0, 0)))
        args.append(bins)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, width, padded), acc))
        out_specs.append(pl.BlockSpec((None, None, width, bk), lambda j, b, h: (b, h, 0, j)))
    kernel = functools.partial(_columns_kernel, cfg=cfg, pooled=pooled,
                               num_query_blocks=-(-cfg.length // cfg.block_q))
    outs = _pallas_call(kernel, cfg, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, name="attnjax_columns")(*args)
    received = outs[0][:, :, 0]  # (B, N, Tp)
    return received, (outs[1] if pooled else None)


# --------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kmask_ref, dq_ref, *,
               cfg: _Config, num_key_blocks: int):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    iq = pl.program_id(0)
    q = q_ref[...]  # (bq, Dp)
    do = do_ref[...]  # (bq, Dp)
    lse = lse_ref[...]  # (bq, 1)
    delta = delta_ref[...]  # (bq, 1)
    query_pos = iq * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # (bk, Dp)
        v = v_ref[pl.ds(start, bk), :]  # (bk, Dp)
        key_vis = kmask_ref[:, pl.ds(start, bk)] != 0  # (1, bk)
        key_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)
        visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (bq, bk) or (1, bk)
        s = _dot(q, k, (1, 1), acc, precision) * cfg.scale  # (bq, bk)
        p = jnp.exp(jnp.where(visible, s - lse, MASK_VALUE))  # (bq, bk)
        dp = _dot(do, v, (1, 1), acc, precision)  # (bq, bk)
        ds = p * (dp - delta)  # (bq, bk)
        return dq + _dot(ds.astype(k.dtype), k, (1, 0), acc, precision)  # (bq, Dp)

    if cfg.causal:
        upper = jnp.minimum(_div((iq + 1) * bq + bk - 1, bk), num_key_blocks)
    else:
        upper = num_key_blocks
    dq = lax.fori_loop(0, upper, body, jnp.zeros(dq_ref.shape, acc))  # (bq, Dp)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kmask_ref, dk_ref, dv_ref, *,
                 cfg: _Config, num_query_blocks: int):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    acc = accumulation_dtype(q_ref.dtype)
    precision = matmul_precision(q_ref.dtype)
    jk = pl.program_id(0)
    k = k_ref[...]  # (bk, Dp)
    v = v_ref[...]  # (bk, Dp)
    key_vis = kmask_ref[...] != 0  # (1, bk)
    key_pos = jk * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # (1, bk)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]  # (bq, Dp)
        do = do_ref[pl.ds(start, bq), :]  # (bq, Dp)
        lse = lse_ref[pl.ds(start, bq), :]  # (bq, 1)
        delta = delta_ref[pl.ds(start, bq), :]  # (bq, 1)
        query_pos = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # (bq, 1)
        visible = _visible(key_vis, key_pos, query_pos, cfg.causal)  # (bq, bk) or (1, bk)
        s = _dot(q, k, (1, 1), acc, precision) * cfg.scale  # (bq, bk)
        p = jnp.exp(jnp.where(visible, s - lse, MASK_VALUE))  # (bq, bk)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0), acc, precision)  # (bk, Dp)
        dp = _dot(do, v, (1, 1), acc, precision)  # (bq, bk)
        ds = p * (dp - delta)  # (bq, bk)
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0), acc, precision)  # (bk, Dp)
        return dk, dv

    lower = _div(jk * bk, bq) if cfg.causal else 0
    zeros = jnp.zeros(dk_ref.shape, acc)  # (bk, Dp)
    dk, dv = lax.fori_loop(lower, num_query_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, kmask, out, lse, d_out, cfg: _Config):
    """dq, dk, dv (B, N, Tp, Dp) from the saved output and LSE (B, N, Tp)."""
    batch, heads, padded, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    delta = jnp.sum(out.astype(acc) * d_out.astype(acc), axis=-1, keepdims=True)  # (B, N, Tp, 1)
    lse = lse[..., None]  # (B, N, Tp, 1)
    d_out = d_out.astype(q.dtype)  # (B, N, Tp, Dp)

    def whole(width):
        return pl.BlockSpec((None, None, padded, width), lambda i, b, h: (b, h, 0, 0))

    def tile(rows, width):
        return pl.BlockSpec((None, None, rows, width), lambda i, b, h: (b, h, i, 0))

    dq = _pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_key_blocks=-(-cfg.length // bk)), cfg,
        grid=(padded // bq, batch, heads),
        in_specs=[tile(bq, head_dim), whole(head_dim), whole(head_dim), tile(bq, head_dim),
                  tile(bq, 1), tile(bq, 1),
                  pl.BlockSpec((None, 1, padded), lambda i, b, h: (b, 0, 0))],
        out_specs=tile(bq, head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="attnjax_backward_dq",
    )(q, k, v, d_out, lse, delta, kmask)
    dk, dv = _pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, num_query_blocks=-(-cfg.length // bq)), cfg,
        grid=(padded // bk, batch, heads),
        in_specs=[whole(head_dim), tile(bk, head_dim), tile(bk, head_dim), whole(head_dim),
                  whole(1), whole(1),
                  pl.BlockSpec((None, 1, bk), lambda i, b, h: (b, 0, i))],
        out_specs=[tile(bk, head_dim), tile(bk, head_dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="attnjax_backward_dkdv",
    )(q, k, v, d_out, lse, delta, kmask)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, kmask, cfg: _Config):
    return _forward(q, k, v, kmask, cfg)


def _flash_fwd(q, k, v, kmask, cfg: _Config):
    out, rows = _forward(q, k, v, kmask, cfg)
    return (out, rows), (q, k, v, kmask, out, rows[0])


def _flash_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, kmask, out, lse = residuals
    d_out, _ = cotangents  # the rows are statistics: no gradient flows through them
    dq, dk, dv = _backward(q, k, v, kmask, out, lse, d_out, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- entry point


@functools.partial(
    jax.jit, static_argnames=("causal", "scale", "stats", "pool", "block_sizes", "backend"))
def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    stats: bool = False,
    pool: Optional[int] = None,
    block_sizes: Optional[BlockSizes] = None,
    backend: Optional[str] = None,
):
    """Pallas attention. Same contract as ``reference_attention``.

    q, k, v: (B, T, N, H); mask: (B, T) bool or None. Returns out (B, T, N, H), and
    with ``stats=True`` also ``AttentionStats``. ``backend`` is one of ``BACKENDS``
    (default: ``default_backend()``); ``block_sizes`` default per backend.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"pallas_attention(backend={backend!r}): expected one of {BACKENDS}.")
    batch, length, heads, head_dim = q.shape
    scale = default_scale(head_dim) if scale is None else float(scale)
    sizes = _fit_blocks(block_sizes or BlockSizes.for_backend(backend), backend, length)
    padded = round_up(length, math.lcm(*sizes.tiles))
    if backend == "mosaic":
        padded_dim = head_dim
    else:
        padded_dim = max(_MIN_TRITON_DIM, pl.next_power_of_2(head_dim))
    num_warps = sizes.num_warps or (4 if padded_dim <= 64 else 8)
    cfg = _Config(
        scale=scale, causal=causal, length=length, stats=stats, backend=backend,
        block_q=sizes.block_q, block_k=sizes.block_k, block_q_bwd=sizes.block_q_bwd,
        block_k_bwd=sizes.block_k_bwd, num_warps=num_warps, num_stages=sizes.num_stages,
    )

    def prepare(x):
        x = heads_major(x, padded)  # (B, N, Tp, H)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded_dim - head_dim)))  # (B, N, Tp, Dp)

    qh, kh, vh = prepare(q), prepare(k), prepare(v)  # (B, N, Tp, Dp) each
    kmask = padded_key_mask(mask, batch, length, padded).astype(jnp.int32)[:, None, :]  # (B, 1, Tp)
    out, rows = _flash(qh, kh, vh, kmask, cfg)  # (B, N, Tp, Dp), rows (B, N, Tp)
    out = jnp.swapaxes(out, 1, 2)[:, :length, :, :head_dim]  # (B, T, N, H)
    if not stats:
        return out

    acc = accumulation_dtype(q.dtype)
    qh, kh = lax.stop_gradient(qh), lax.stop_gradient(kh)
    lse, entropy, max_prob, argmax, mean_distance = (lax.stop_gradient(r) for r in rows)
    query_weight = padded_query_weight(mask, batch, length, padded, acc)[..., None]  # (B, Tp, 1)
    bins = None
    if pool is not None:
        if backend == "mosaic":
            width = round_up(pool, _TPU_SUBLANES)
        else:
            width = max(_MIN_TRITON_DIM, pl.next_power_of_2(pool))
        bins = padded_bin_one_hot(length, padded, pool, acc, width=width).T  # (P', Tp)
    received, bin_sums = _columns(qh, kh, kmask, query_weight, bins, lse, cfg)
    return out, assemble_stats(
        qh, kh, mask, causal=causal, scale=scale, length=length, pool=pool,
        lse=lse, entropy=entropy, max_prob=max_prob, argmax=argmax,
        mean_distance=mean_distance, received=received, bin_sums=bin_sums,
    )
