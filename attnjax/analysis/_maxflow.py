"""Exact max-flow on the layered attention graph, many (source, sink) pairs at once.

The graph of Abnar & Zuidema 2020 for one sequence of n tokens: node layers 0..M,
node (l, i) = token i's representation after layer l (layer 0 = the input embeddings).
Edge (l, i) -> (l - 1, j) has capacity A_l[i, j] (heads-averaged attention of layer l).

For a source (M, s) and a sink (0, t) only the node layers 1..M-1 between them carry
flow: other nodes of layer M have no in-edges and other inputs are dead ends. So one
problem is

    source edges  s -> (M-1, u)   capacity  src[u] = A_M[s, u]
    middle edges  (j+1, u) -> (j, k)        cap[j-1][u, k] = A_(j+1)[u, k],  j = 1..M-2
    sink edges    (1, k) -> t     capacity  snk[k] = A_1[k, t]

and ``max_flow`` solves a batch of them (same middle, per-pair src and snk).

Algorithm: synchronous (all nodes at once) push-relabel of Goldberg & Tarjan 1988 with
exact distance labels recomputed after every pulse ("global relabelling": Bellman-Ford
sweeps over the residual graph, one layer at a time). A pulse pushes, from every node
with excess and a finite label, to all admissible residual edges (label drops by one),
sharing the excess in proportion to residual capacity. Only the first phase runs (a
maximum preflow): it ends when no node with excess can still reach the sink, and the
sink's inflow is then the max-flow value (returning leftover excess to the source, the
second phase, does not change it). The answer is exact up to floating point: excess
below ``tolerance`` (1e-6 in float32, 1e-12 in float64) is treated as zero.

Cost: each pulse touches every edge of every pair, O(P * (M - 2) * n^2) work for P
pairs; on the graphs of real models the loop ends after 30-60 pulses (measured on
all-MiniLM-L6-v2 and on random 12-layer attention), against the worst-case bound of
O(V^2) pulses. Memory is a few copies of (P, M - 2, n, n).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

UNREACHABLE = 1 << 20  # label of nodes that cannot reach the sink
MAX_PULSES = 10_000    # a guard far above the 30-60 pulses seen in practice


def _tolerance(dtype) -> float:
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def _distances(cap: jax.Array, flow: jax.Array, sink_residual: jax.Array, tol: float) -> jax.Array:
    """Exact residual-graph distance to the sink of every node, (K, n) int32.

    cap, flow (K-1, n, n): middle edges from node layer j+1 (rows) to j (columns);
    sink_residual (n,): what each node of node layer 0 may still send to the sink.
    """
    num_layers = cap.shape[0] + 1
    n = cap.shape[1]
    start = jnp.full((num_layers, n), UNREACHABLE, jnp.int32)  # (K, n)
    start = start.at[0].set(jnp.where(sink_residual > tol, 1, UNREACHABLE))
    down_open = (cap - flow) > tol  # (K-1, n, n) residual forward edge j+1 -> j
    up_open = flow > tol  # (K-1, n, n) residual backward edge j -> j+1

    def sweep(dist):
        def upward(j, dist):  # labels of layer j from layer j-1 through forward edges
            candidate = jnp.where(down_open[j - 1], dist[j - 1][None, :] + 1, UNREACHABLE).min(1)  # (n,)
            return dist.at[j].set(jnp.minimum(dist[j], candidate))

        def downward(i, dist):  # labels of layer j from layer j+1 through backward edges
            j = num_layers - 2 - i
            candidate = jnp.where(up_open[j], dist[j + 1][:, None] + 1, UNREACHABLE).min(0)  # (n,)
            return dist.at[j].set(jnp.minimum(dist[j], candidate))

        dist = lax.fori_loop(1, num_layers, upward, dist)
        return lax.fori_loop(0, num_layers - 1, downward, dist)

    first = sweep(start)
    dist, _ = lax.while_loop(
        lambda state: jnp.any(state[0] != state[1]),
        lambda state: (sweep(state[0]), state[0]),
        (sweep(first), first),
    )
    return jnp.minimum(dist, UNREACHABLE)


def _one_max_flow(cap: jax.Array, src: jax.Array, snk: jax.Array) -> tuple:
    """Max-flow value of one problem (module docstring) and the pulses it took."""
    tol = _tolerance(cap.dtype)
    num_layers = cap.shape[0] + 1
    flow = jnp.zeros_like(cap)  # (K-1, n, n)
    sink_flow = jnp.zeros_like(snk)  # (n,)
    excess = jnp.zeros((num_layers, cap.shape[1]), cap.dtype).at[-1].set(src)  # (K, n) source edges saturated
    label = _distances(cap, flow, snk, tol)  # (K, n)

    def active(excess, label):
        return (excess > tol) & (label < UNREACHABLE)  # (K, n)

    def pulse(state):
        flow, sink_flow, excess, label, count = state
        is_active = active(excess, label)
        sink_residual = snk - sink_flow  # (n,)
        to_sink = jnp.where(is_active[0] & (label[0] == 1) & (sink_residual > tol), sink_residual, 0.0)  # (n,)
        down_residual = cap - flow  # (K-1, n, n)
        down = jnp.where(
            is_active[1:, :, None] & (label[1:, :, None] == label[:-1, None, :] + 1) & (down_residual > tol),
            down_residual, 0.0,
        )  # (K-1, n, n) admissible forward residuals, rows = senders
        up = jnp.where(
            is_active[:-1, None, :] & (label[:-1, None, :] == label[1:, :, None] + 1) & (flow > tol),
            flow, 0.0,
        )  # (K-1, n, n) admissible backward residuals, columns = senders
        admissible = jnp.zeros_like(excess).at[0].add(to_sink)
        admissible = admissible.at[1:].add(down.sum(2)).at[:-1].add(up.sum(1))  # (K, n)
        share = jnp.where(admissible > 0, jnp.minimum(1.0, excess / jnp.where(admissible > 0, admissible, 1.0)), 0.0)
        to_sink = to_sink * share[0]  # (n,)
        down = down * share[1:, :, None]  # (K-1, n, n)
        up = up * share[:-1, None, :]  # (K-1, n, n)
        flow = flow + down - up
        excess = excess.at[0].add(-to_sink)
        excess = excess.at[1:].add(up.sum(2) - down.sum(2)).at[:-1].add(down.sum(1) - up.sum(1))
        sink_flow = sink_flow + to_sink
        label = _distances(cap, flow, snk - sink_flow, tol)
        return flow, sink_flow, excess, label, count + 1

    state = lax.while_loop(
        lambda state: jnp.any(active(state[2], state[3])) & (state[4] < MAX_PULSES),
        pulse,
        (flow, sink_flow, excess, label, jnp.int32(0)),
    )
    return state[1].sum(), state[4]


@jax.jit
def max_flow(cap: jax.Array, src: jax.Array, snk: jax.Array) -> tuple:
    """Max-flow values of a batch of layered problems (module docstring).

    cap (M-2, n, n) shared middle capacities (M >= 3); src, snk (P, n) per pair.
    Returns (values (P,), pulses (P,) int32).
    """
    return jax.vmap(_one_max_flow, in_axes=(None, 0, 0))(cap, src, snk)
