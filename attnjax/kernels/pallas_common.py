"""What the Pallas kernels share: the static launch config, compiler parameters,
matmuls, and the score/visibility rules applied inside a tile.

Each kernel file (pallas_forward, pallas_columns, pallas_backward) imports from here;
the entry point and the custom_vjp wiring live in pallas_attention.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.kernels.reference import MASK_VALUE
from attnjax.kernels.spec import AttentionSpec, cap_scores, positions_visible

BACKENDS = ("triton", "mosaic", "interpret")
MIN_TRITON_DIM = 16      # tl.dot needs every matmul dimension >= 16
TPU_LANES = 128          # Mosaic: lane-dim blocks are multiples of 128
TPU_SUBLANES = 8
NO_INDEX = jnp.iinfo(jnp.int32).max  # "no candidate" in the first-argmax search


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static description of one Pallas call (hashable: a custom_vjp nondiff argument).

    spec:      the normalised call (scale, causal, window, softcap, groups, stats, pool);
    length:    real sequence length T; ``padded`` Tp is T rounded up to every tile;
    key_mask:  whether the kernels read the key-mask input (False for mask=None: only
               sequence padding, if any, is masked, by position);
    backend:   "triton", "mosaic" or "interpret";
    block_*:   tiles (see BlockSizes); num_warps / num_stages: Triton launch settings.
    """

    spec: AttentionSpec
    length: int
    padded: int
    key_mask: bool
    backend: str
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int


def triton_compiler_params():
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


def mosaic_compiler_params():
    from jax.experimental.pallas import tpu as pl_tpu
    return getattr(pl_tpu, "CompilerParams", None) or getattr(pl_tpu, "TPUCompilerParams")


def pallas_call(kernel, cfg: KernelConfig, *, grid, in_specs, out_specs, out_shape, name):
    """pl.pallas_call with the backend's compiler parameters (every grid axis parallel:
    each program writes only its own output blocks)."""
    if cfg.backend == "triton":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            params = triton_compiler_params()(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif cfg.backend == "mosaic":
        params = mosaic_compiler_params()(dimension_semantics=("parallel",) * len(grid))
    else:
        params = None
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=cfg.backend == "interpret", name=name,
    )


def dot(a, b, contract, acc_dtype, precision):
    """2-D matmul contracting a's axis contract[0] with b's axis contract[1]."""
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())),
        precision=precision, preferred_element_type=acc_dtype,
    )


def kv_head(query_head, groups: int):
    """The kv head a query head (a program id) reads: h // groups (transformers'
    repeat_kv order). lax.div: ``//`` adds sign fix-ups that not every backend lowers
    for program ids, and the ids are never negative."""
    if groups == 1:
        return query_head
    return lax.div(query_head, jnp.int32(groups))


def scores(q, k, spec: AttentionSpec, acc_dtype, precision):
    """(bq, bk) scores ``scale * q.k``, soft-capped when the spec has a cap."""
    s = dot(q, k, (1, 1), acc_dtype, precision) * spec.scale  # (bq, bk)
    return cap_scores(s, spec.softcap)  # (bq, bk)


def visibility(cfg: KernelConfig, kmask_row, key_pos, query_pos, edge: bool = True) -> Optional[jnp.ndarray]:
    """Which keys of a tile each query sees: (bq, bk) or (1, bk) bool, or None when
    every key of the tile is visible.

    kmask_row: (1, bk) int32 from the key-mask input (read only when cfg.key_mask);
    key_pos (1, bk) and query_pos (bq, 1): int32 positions. ``edge=False`` promises a
    tile that every query sees by position and that holds no sequence padding
    (``interior_key_blocks``): only the key mask is applied.
    """
    visible = None
    if cfg.key_mask:
        visible = kmask_row != 0  # (1, bk)
    elif cfg.padded > cfg.length and edge:
        visible = key_pos < cfg.length  # (1, bk)
    if not edge:
        return visible
    positional = positions_visible(query_pos, key_pos, cfg.spec.causal, cfg.spec.window)  # (bq, bk) or None
    if positional is None:
        return visible
    return positional if visible is None else visible & positional  # (bq, bk)


def has_edges(cfg: KernelConfig):
    """(front, back): whether key tiles before / after the interior ones can need a
    positional mask (the window's far edge; the diagonal or sequence padding)."""
    padding = cfg.padded > cfg.length and not cfg.key_mask
    return cfg.spec.window is not None, cfg.spec.causal or padding


def interior_key_blocks(first_query, last_query, lower, upper, block_k: int, cfg: KernelConfig):
    """Split the key blocks [lower, upper) a query block visits into [lower, a) and
    [b, upper), which need the positional mask, and [a, b), which every query of the
    block sees in full (inside the window, at or below the diagonal, no sequence
    padding). FlashAttention-2 masks only the diagonal blocks in the same way."""
    spec = cfg.spec
    front, back = has_edges(cfg)
    a, b = lower, upper
    if front:  # keys j >= last_query - W + 1 are inside every query's window
        first_inside = jnp.maximum(last_query - spec.window + 1, 0) + (block_k - 1)
        a = jnp.minimum(jnp.maximum(a, lax.div(first_inside, jnp.int32(block_k))), upper)
    if spec.causal:  # keys j <= first_query are visible to every query of the block
        b = jnp.minimum(b, lax.div(first_query + 1, jnp.int32(block_k)))
    if cfg.padded > cfg.length and not cfg.key_mask:
        b = jnp.minimum(b, cfg.length // block_k)
    if back:
        b = jnp.maximum(b, a)
    return a, b


def interior_query_blocks(first_key, last_key, lower, upper, block_q: int, cfg: KernelConfig):
    """The column passes' split of the query blocks [lower, upper) that see a key
    block: [lower, a) at the diagonal and [b, upper) at the window's far end need the
    positional mask; every query of [a, b) sees every key of the block. A key block
    holding sequence padding (mask=None) has no interior."""
    spec = cfg.spec
    a, b = lower, upper
    if spec.causal:  # queries i >= last_key see the whole key block
        a = jnp.minimum(jnp.maximum(a, lax.div(last_key + (block_q - 1), jnp.int32(block_q))), upper)
    if spec.window is not None:  # queries i <= first_key + W - 1 see it too
        b = jnp.minimum(b, lax.div(first_key + spec.window, jnp.int32(block_q)))
    if cfg.padded > cfg.length and not cfg.key_mask:
        a = jnp.where(last_key >= cfg.length, upper, a)
    return a, jnp.maximum(b, a)


def masked(s, visible):
    """Scores with MASK_VALUE at invisible keys (unchanged when visible is None)."""
    return s if visible is None else jnp.where(visible, s, MASK_VALUE)


def num_blocks(length: int, block: int) -> int:
    """Blocks that hold at least one real position (later ones are all padding)."""
    return -(-length // block)
