"""Pallas attention with streaming statistics: the entry point and the custom_vjp.

Kernels, one pass per file (as JAX's ``pallas/ops`` keep them):

1. ``pallas_forward``: online softmax (FlashAttention-2) giving the output, the
   natural-log LSE and, with ``stats``, the row statistics in the same pass;
2. ``pallas_columns``: recomputes ``p = exp(s - lse)`` over key blocks for
   ``received`` and the pooled map's row-bin sums;
3. ``pallas_backward``: the dq kernel and the dk/dv kernel, through ``jax.custom_vjp``.

Every kernel runs one program per (block, batch, head) with the loop over the other
sequence axis inside (``lax.fori_loop``), the layout of JAX's ``ops/gpu/attention.py``.
All of them take the normalised call (``attnjax.kernels.spec``): grouped-query
attention through BlockSpec index maps (query head h reads kv head h // groups; K/V
are never repeated), a sliding window and causality by skipping key or query blocks
outside the band (a window of W costs O(T W)), and soft-capping before masking,
forward and backward. ``first_mass``, ``self_mass`` and ``prev_mass`` are read after
the forward from the LSE (``common.assemble_stats``, O(T H)); statistics carry no
gradient.

Backends: ``"triton"`` (GPU; Triton CompilerParams; power-of-2 blocks, head_dim
zero-padded to a power of 2), ``"mosaic"`` (TPU; blocks multiples of 128, grid axes
all parallel), ``"interpret"`` (any backend, ``pallas_call(interpret=True)``: the
same kernels run by the Pallas interpreter, slow, for tests on CPU). Sequences are
zero-padded to a multiple of the blocks and the padding masked.

float32 inputs use full float32 matmuls (no TF32); bf16/f16 inputs multiply in their
own dtype with float32 accumulation (p is cast to v's dtype for p @ v, as in
FlashAttention). Statistics accumulate in float32 (float64 for float64 inputs, which
only the interpreter runs).

What is verified where: tests/test_pallas.py runs the kernels in the interpreter
against the reference on CPU, and compiled (Triton) when the default backend is a GPU
(benchmarks/gpu_check.sh). On any machine it also lowers every kernel for CUDA
(Triton IR) and TPU (Mosaic), which catches unsupported operations and block shapes,
but not what only the backend compilers check (register or VMEM budgets, Mosaic
layouts). On TPU one kv head's whole K and V (and, in the dk/dv kernel, a group's
whole q and dO) are VMEM blocks, which bounds T under the default scoped-VMEM limit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.kernels.common import (
    assemble_stats,
    flash_function,
    heads_major,
    padded_bin_one_hot,
    padded_key_mask,
    padded_query_weight,
    round_up,
)
from attnjax.kernels.pallas_backward import backward
from attnjax.kernels.pallas_columns import columns
from attnjax.kernels.pallas_common import (
    BACKENDS,
    MIN_TRITON_DIM,
    TPU_LANES,
    TPU_SUBLANES,
    KernelConfig,
)
from attnjax.kernels.pallas_forward import forward
from attnjax.kernels.reference import accumulation_dtype
from attnjax.kernels.spec import AttentionSpec, keyword_entry

__all__ = ["BACKENDS", "BlockSizes", "default_backend", "pallas_attention", "pallas_core"]

_TILE_NAMES = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")


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
        return tuple(getattr(self, name) for name in _TILE_NAMES)


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
    for name, value in zip(_TILE_NAMES, sizes.tiles):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"BlockSizes.{name}={value!r}: expected an int.")
        if backend == "mosaic" and value % TPU_LANES:
            raise ValueError(
                f"BlockSizes.{name}={value}: Mosaic (TPU) tiles must be multiples of {TPU_LANES}.")
        if backend != "mosaic" and (value < MIN_TRITON_DIM or value & (value - 1)):
            raise ValueError(
                f"BlockSizes.{name}={value}: Triton tiles must be powers of 2 and at least "
                f"{MIN_TRITON_DIM} (the interpreter follows the same rule, so that what "
                "it tests is what runs on a GPU).")
    if backend == "mosaic":
        cap = round_up(length, TPU_LANES)
    else:
        cap = max(MIN_TRITON_DIM, pl.next_power_of_2(length))
    return dataclasses.replace(sizes, **{name: min(value, cap) for name, value in zip(_TILE_NAMES, sizes.tiles)})


# The custom_vjp every kernel family shares (common.flash_function): the Pallas forward,
# and the FlashAttention-2 backward recomputing p from the saved LSE.
_flash = flash_function(forward, backward)


@functools.partial(jax.jit, static_argnames=("spec", "block_sizes", "backend"))
def pallas_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                spec: AttentionSpec, *, block_sizes: Optional[BlockSizes] = None,
                backend: Optional[str] = None):
    """Pallas attention on a normalised call (``spec.normalize``'s mask and spec).

    q: (B, T, Hq, D); k, v: (B, T, Hkv, D) with Hq = spec.groups * Hkv; mask: (B, T)
    bool or None. Returns out (B, T, Hq, D), and with ``spec.stats`` also
    ``AttentionStats`` (per query head). ``backend`` is one of ``BACKENDS`` (default:
    ``default_backend()``); ``block_sizes`` default per backend.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"pallas_attention(backend={backend!r}): expected one of {BACKENDS}.")
    batch, length, heads, head_dim = q.shape
    sizes = _fit_blocks(block_sizes or BlockSizes.for_backend(backend), backend, length)
    padded = round_up(length, math.lcm(*sizes.tiles))
    if backend == "mosaic":
        padded_dim = head_dim
    else:
        padded_dim = max(MIN_TRITON_DIM, pl.next_power_of_2(head_dim))
    cfg = KernelConfig(
        spec=spec, length=length, padded=padded, key_mask=mask is not None, backend=backend,
        block_q=sizes.block_q, block_k=sizes.block_k, block_q_bwd=sizes.block_q_bwd,
        block_k_bwd=sizes.block_k_bwd, num_warps=sizes.num_warps or (4 if padded_dim <= 64 else 8),
        num_stages=sizes.num_stages,
    )

    def prepare(x):
        x = heads_major(x, padded)  # (B, N, Tp, H)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded_dim - head_dim)))  # (B, N, Tp, Dp)

    qh, kh, vh = prepare(q), prepare(k), prepare(v)  # (B, Hq, Tp, Dp), (B, Hkv, Tp, Dp) x2
    kmask = padded_key_mask(mask, batch, length, padded).astype(jnp.int32)[:, None, :]  # (B, 1, Tp)
    out, rows = _flash(qh, kh, vh, kmask, cfg)  # (B, Hq, Tp, Dp), rows (B, Hq, Tp)
    out = jnp.swapaxes(out, 1, 2)[:, :length, :, :head_dim]  # (B, T, Hq, D)
    if not spec.stats:
        return out

    acc = accumulation_dtype(q.dtype)
    qh, kh = lax.stop_gradient(qh), lax.stop_gradient(kh)
    lse, entropy, max_prob, argmax, mean_distance = (lax.stop_gradient(r) for r in rows)
    query_weight = padded_query_weight(mask, batch, length, padded, acc)[..., None]  # (B, Tp, 1)
    bins = None
    if spec.pool is not None:
        if backend == "mosaic":
            width = round_up(spec.pool, TPU_SUBLANES)
        else:
            width = max(MIN_TRITON_DIM, pl.next_power_of_2(spec.pool))
        bins = padded_bin_one_hot(length, padded, spec.pool, acc, width=width).T  # (P', Tp)
    received, bin_sums = columns(qh, kh, kmask, query_weight, bins, lse, cfg)
    return out, assemble_stats(
        qh, kh, mask, spec, length=length, lse=lse, entropy=entropy, max_prob=max_prob,
        argmax=argmax, mean_distance=mean_distance, received=received, bin_sums=bin_sums,
    )


pallas_attention = keyword_entry(pallas_core, name="pallas_attention", doc="""Pallas attention; the contract of ``attnjax.kernels.attention``.

q: (B, T, Hq, D); k, v: (B, T, Hkv, D) (Hkv divides Hq); mask: (B, T) or None.
Validates through ``spec.normalize`` and runs ``pallas_core`` with its own options
``block_sizes`` (default per backend) and ``backend`` ("triton", "mosaic" or
"interpret"; default: the one for JAX's default device).
""")
