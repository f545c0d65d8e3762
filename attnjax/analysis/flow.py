"""Following attention across layers: rollout, attention flow, one token's view, focus.

Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers". For a sequence and
a recorded layer l (model layers numbered from 0, inputs of the first recorded layer
being the embeddings), let

    A_l = rownorm(mean over heads of attention_l + I)      (residual=True)
    A_l = mean over heads of attention_l                   (residual=False)

where rownorm divides each row by its sum. Rollout multiplies through the layers:
R_0 = A_0, R_l = A_l R_(l-1); R_l[i, j] is how much of token i's representation after
layer l comes from input token j. Attention flow treats the same A_l as capacities of a
layered graph (edge from token i after layer l to token j before it, capacity A_l[i, j])
and takes the max-flow from (l, i) to input j, normalised over inputs.

Rollout and flow need every layer from the first recorded one up to l: they refuse a
Trace whose recorded layers have gaps. Sliding windows (Trace.windows) need nothing
special: A_l holds no attention outside a layer's window (validate_attention checks),
and the products and max-flows carry that through, so information from outside the
window still arrives through earlier layers, as it does in the model.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attnjax.analysis import _maxflow
from attnjax.analysis._common import (
    ALL_HEADS,
    TraceOrTraces,
    as_single_trace,
    check_head,
    check_sequence,
    layer_ids,
    layer_position,
    require_attention,
    token_strings,
    trace_windows,
    validate_attention,
)
from attnjax.trace import Trace


def _check_consecutive(trace: Trace, what: str) -> None:
    ids = layer_ids(trace)
    if list(ids) != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(
            f"{what} multiplies through consecutive layers, but this Trace recorded layers {ids}; "
            "capture every layer (Capture(layers=None)) or a consecutive range."
        )


@functools.partial(jax.jit, static_argnames=("residual",))
def _layer_maps(attention: jax.Array, mask: jax.Array, *, residual: bool) -> jax.Array:
    """(L, B, T, T) heads-averaged, optionally residual-added and row-normalised maps."""
    maps = attention.astype(jnp.float32).mean(axis=2)  # (L, B, T, T)
    if residual:
        seq = maps.shape[-1]
        maps = maps + jnp.eye(seq, dtype=maps.dtype)[None, None]  # (L, B, T, T)
        maps = maps / maps.sum(-1, keepdims=True)  # (L, B, T, T)
    return maps * mask[None, :, None, :]  # (L, B, T, T) padding keys stay 0


@functools.partial(jax.jit, static_argnames=("residual",))
def _rollout(attention: jax.Array, mask: jax.Array, *, residual: bool) -> jax.Array:
    maps = _layer_maps(attention, mask, residual=residual)  # (L, B, T, T)

    def step(carry, layer_map):
        joint = jnp.einsum("BQK,BKJ->BQJ", layer_map, carry)  # (B, T, T)
        return joint, joint

    _, rest = jax.lax.scan(step, maps[0], maps[1:])  # (L-1, B, T, T)
    return jnp.concatenate([maps[:1], rest], axis=0)  # (L, B, T, T)


def rollout(trace: Trace, residual: bool = True) -> jax.Array:
    """Attention rollout (Abnar & Zuidema 2020) as an (L, B, T, T) array.

    rollout(trace)[l, b, i, j]: share of token i's representation after recorded layer l
    that comes from input token j (definition in the module docstring). Rows of
    non-padding queries sum to 1; padding rows and columns are meaningless/zero.
    """
    as_single_trace(trace, "rollout")
    require_attention(trace, "rollout")
    _check_consecutive(trace, "rollout")
    validate_attention(trace)
    return _rollout(trace.attention, trace.mask, residual=residual)


def rollout_frame(trace: Trace, residual: bool = True, *, sequence: Optional[int] = None) -> pd.DataFrame:
    """rollout as a long DataFrame over non-padding (query, key) pairs.

    sequence: one sequence index, or None for all.
    Columns: layer (int, model layer: rollout through that layer), sequence (int),
    query (int), key (int), query_token (str, "" without tokens), key_token (str),
    weight (float: rollout[layer, sequence, query, key]).
    """
    joint = np.asarray(rollout(trace, residual))  # (L, B, T, T)
    sequences = range(trace.batch_size) if sequence is None else [sequence]
    if sequence is not None:
        check_sequence(trace, sequence)
    return _pair_frame(trace, joint, sequences, "weight")


def _pair_frame(trace: Trace, values: np.ndarray, sequences, column: str) -> pd.DataFrame:
    """Long frame of values (L, B, T, T) over non-padding query/key pairs."""
    mask = np.asarray(trace.mask, bool)
    tokens = token_strings(trace)
    ids = layer_ids(trace)
    parts = []
    for b in sequences:
        positions = np.flatnonzero(mask[b])
        n = len(positions)
        query = np.repeat(positions, n)
        key = np.tile(positions, n)
        block = values[:, b][:, positions][:, :, positions].reshape(len(ids), -1)  # (L, n * n)
        names = tokens[b] if tokens is not None else np.full(mask.shape[1], "", object)
        parts.append(pd.DataFrame({
            "layer": np.repeat(np.asarray(ids, np.int64), n * n),
            "sequence": np.int64(b),
            "query": np.tile(query, len(ids)).astype(np.int64),
            "key": np.tile(key, len(ids)).astype(np.int64),
            "query_token": np.tile(names[query], len(ids)),
            "key_token": np.tile(names[key], len(ids)),
            column: block.reshape(-1).astype(np.float64),
        }))
    return pd.concat(parts, ignore_index=True)


def attention_flow(
    trace: Trace,
    *,
    residual: bool = True,
    sequence: int = 0,
    layer: Optional[int] = None,
    queries: Optional[Sequence[int]] = None,
) -> pd.DataFrame:
    """Attention flow (Abnar & Zuidema 2020) from the outputs of one layer to the inputs.

    For each query position i of ``sequence`` and input position j: the max-flow value
    from node (layer, i) to input node j in the layered graph with capacities A_l
    (module docstring), then normalised over j. This is the paper's pairwise definition,
    computed exactly (float64, to ~1e-10) by a dense push-relabel
    (attnjax.analysis._maxflow), one max-flow per (i, j) pair. A single max-flow per
    query into a super-sink over all inputs would be n times cheaper but is not the same
    quantity: it splits one unit of flow among the inputs in one of many optimal ways,
    while the paper asks how much could reach each input on its own.

    layer: model layer whose outputs are the sources (default: the last recorded one);
    queries: source positions (default: every non-padding position).

    Cost: n max-flows per query, each O(pulses * (layers - 2) * n^2) with 30-60 pulses
    in practice, spread over the CPU cores. Measured on 2 shared CPU cores at n = 128
    (benchmarks/RESULTS.md): all-MiniLM-L6-v2 (6 layers) about 1.1 s per query, 142 s
    for all 128; a BERT-base-sized graph (12 layers, 12 heads) about 2.3 s per query,
    296 s for all 128. Pass a few ``queries`` for a quick look.

    Columns: layer (int), sequence (int), query (int), key (int: input position),
    query_token (str), key_token (str), max_flow (float: the max-flow value, at most 1),
    flow (float: max_flow normalised to sum to 1 over keys).
    """
    as_single_trace(trace, "attention_flow")
    require_attention(trace, "attention_flow")
    _check_consecutive(trace, "attention_flow")
    check_sequence(trace, sequence)
    validate_attention(trace)
    ids = layer_ids(trace)
    top = len(ids) - 1 if layer is None else layer_position(trace, layer)
    mask = np.asarray(trace.mask, bool)[sequence]
    positions = np.flatnonzero(mask)
    if queries is None:
        queries = positions
    queries = np.asarray(queries, np.int64).reshape(-1)
    bad = [int(q) for q in queries if q < 0 or q >= mask.shape[0] or not mask[q]]
    if bad:
        raise ValueError(
            f"attention_flow queries {bad} are not non-padding positions of sequence {sequence} "
            f"(valid: {positions.min()}..{positions.max()})."
        )
    attention = np.asarray(trace.attention[: top + 1, sequence], np.float64)  # (l + 1, H, T, T)
    maps = attention[:, :, positions][:, :, :, positions].mean(1)  # (l + 1, n, n) over real tokens
    if residual:
        maps = maps + np.eye(len(positions))[None]
        maps = maps / maps.sum(-1, keepdims=True)
    rows = np.searchsorted(positions, queries)
    values = flow_values(maps, rows)  # (Q, n)
    totals = values.sum(-1, keepdims=True)
    normalised = np.where(totals > 0, values / np.where(totals > 0, totals, 1.0), 0.0)
    tokens = token_strings(trace)
    names = tokens[sequence] if tokens is not None else np.full(mask.shape[0], "", object)
    n = len(positions)
    query = np.repeat(queries, n)
    key = np.tile(positions, len(queries))
    return pd.DataFrame({
        "layer": np.int64(ids[top]),
        "sequence": np.int64(sequence),
        "query": query.astype(np.int64),
        "key": key.astype(np.int64),
        "query_token": names[query],
        "key_token": names[key],
        "max_flow": values.reshape(-1).astype(np.float64),
        "flow": normalised.reshape(-1).astype(np.float64),
    })


def flow_values(maps: np.ndarray, sources: Sequence[int]) -> np.ndarray:
    """Max-flow values (len(sources), n) from nodes (M, s) to every input node.

    maps (M, n, n): the capacity matrices A_1..A_M (maps[l - 1] = A_l) of one sequence.
    """
    maps = np.asarray(maps)
    num_maps, n, _ = maps.shape
    sources = np.asarray(sources, np.int64)
    if num_maps == 1:  # a single edge per pair
        return maps[0][sources]
    if num_maps == 2:  # s -> (1, k) -> t: independent two-edge paths
        return np.minimum(maps[1][sources][:, :, None], maps[0][None]).sum(1)  # (Q, n)
    src = np.repeat(maps[-1][sources], n, axis=0)  # (Q * n, n) pair (s, t) -> row s of A_M
    snk = np.tile(maps[0].T, (len(sources), 1))  # (Q * n, n) pair (s, t) -> column t of A_1
    values, pulses = _maxflow.max_flow(maps[1:-1], src, snk)
    if np.any(pulses >= _maxflow.MAX_PULSES):
        raise RuntimeError(
            f"attention_flow: a max-flow did not converge in {_maxflow.MAX_PULSES} pulses; please report "
            "the input (it should take 30-60)."
        )
    return np.asarray(values, np.float64).reshape(len(sources), n)


def token_flow(
    trace: Trace,
    position: int,
    *,
    sequence: int = 0,
    top_k: int = 5,
    layer: Optional[int] = None,
    head: Optional[int] = None,
) -> pd.DataFrame:
    """Where one token looks in every layer: its attention row per head and averaged.

    position: the query position (0-based, non-padding) in ``sequence``.
    layer, head: keep only that model layer / that head (the head-mean rows stay);
    default every layer and every head.

    Columns: layer (int), head (int; -1 = the mean over heads), sequence (int),
    query (int), query_token (str), key (int), key_token (str), weight (float),
    rank (int: 1 = the most attended key in that layer/head), top (bool: rank <= top_k).
    One row per (layer, head or mean, visible key); on a layer with a sliding window W
    the visible keys are those inside it (position - W < key <= position).
    """
    as_single_trace(trace, "token_flow")
    require_attention(trace, "token_flow")
    check_sequence(trace, sequence)
    if layer is not None:
        layer_position(trace, layer)
    if head is not None:
        check_head(trace, head)
    mask = np.asarray(trace.mask, bool)[sequence]
    if not 0 <= position < mask.shape[0] or not mask[position]:
        raise ValueError(
            f"token_flow position {position} is not a non-padding position of sequence {sequence} "
            f"(it has {int(mask.sum())} tokens in {mask.shape[0]} positions)."
        )
    validate_attention(trace)
    rows = np.asarray(trace.attention[:, sequence, :, position, :], np.float64)  # (L, H, T)
    rows = np.concatenate([rows.mean(1, keepdims=True), rows], axis=1)  # (L, 1 + H, T)
    num_views = rows.shape[1]
    key_position = np.arange(mask.shape[0])
    tokens = token_strings(trace)
    names = tokens[sequence] if tokens is not None else np.full(mask.shape[0], "", object)
    heads = np.concatenate([[ALL_HEADS], np.arange(num_views - 1)])
    parts = []
    for layer_id, window, layer_rows in zip(layer_ids(trace), trace_windows(trace), rows):
        visible = mask.copy()  # (T,) the keys this layer lets the query see
        if trace.causal:
            visible &= key_position <= position
        if window is not None:
            visible &= key_position > position - window
        keys = np.flatnonzero(visible)
        weights = layer_rows[:, keys]  # (1 + H, n)
        order = np.argsort(-weights, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(1, len(keys) + 1)[None], axis=-1)
        n = len(keys)
        parts.append(pd.DataFrame({
            "layer": np.int64(layer_id),
            "head": np.repeat(heads, n).astype(np.int64),
            "sequence": np.int64(sequence),
            "query": np.int64(position),
            "query_token": names[position],
            "key": np.tile(keys, num_views).astype(np.int64),
            "key_token": np.tile(names[keys], num_views),
            "weight": weights.reshape(-1),
            "rank": rank.reshape(-1).astype(np.int64),
            "top": rank.reshape(-1) <= top_k,
        }))
    frame = pd.concat(parts, ignore_index=True)
    if layer is not None:
        frame = frame[frame["layer"] == layer]
    if head is not None:
        frame = frame[frame["head"].isin([ALL_HEADS, head])]
    return frame.reset_index(drop=True)


def focus_by_layer(trace: TraceOrTraces) -> pd.DataFrame:
    """Entropy and max weight per layer: attention going from broad to focused.

    Means over heads of head_scores's columns (every head averages the same queries),
    so it works on corpora and on stats-only Traces.

    Columns: layer (int), entropy (float, nats), normalized_entropy (float),
    max_weight (float), entropy_min / entropy_max (float: the most focused and the
    broadest head of the layer), n_queries (int).
    """
    from attnjax.analysis.scores import head_scores

    scores = head_scores(trace)
    grouped = scores.groupby("layer", sort=True)
    frame = grouped[["entropy", "normalized_entropy", "max_weight"]].mean()
    frame["entropy_min"] = grouped["entropy"].min()
    frame["entropy_max"] = grouped["entropy"].max()
    frame["n_queries"] = grouped["n_queries"].first().astype(np.int64)
    return frame.reset_index()
