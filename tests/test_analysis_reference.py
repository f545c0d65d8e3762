"""Plain-numpy definitions the analyses are tested against (and benchmarked beside).

Written from the papers' definitions, independently of attnjax.analysis: float64, one
layer at a time, explicit loops where the definition is a loop (max-flow per node pair,
as in Abnar & Zuidema's code). benchmarks/analysis.py imports these as "the usual way".

Inputs are numpy arrays: attention (L, B, H, T, T), mask (B, T) bool, input_ids (B, T),
tokens (B, T) strings or None.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

SCORES = (
    "entropy", "normalized_entropy", "max_weight", "self", "previous_token", "next_token",
    "first_token", "cls", "sep", "punctuation", "mean_distance", "induction", "duplicate",
)


def reference_head_scores(attention, mask, input_ids, tokens=None, causal=False, dtype=np.float64, windows=None):
    """dict score -> (L, H), per the definitions in attnjax/analysis/scores.py.

    dtype: the precision of the arithmetic (float32 in benchmarks/analysis.py).
    windows: None, or one sliding window per layer (None or W: query i sees keys
    i - W < k <= i); a query is eligible for a score only if the keys it is about are
    inside its window.
    """
    attention = np.asarray(attention, dtype)
    mask = np.asarray(mask, bool)
    input_ids = np.asarray(input_ids)
    num_layers, batch, heads, seq, _ = attention.shape
    windows = [None] * num_layers if windows is None else list(windows)
    position = np.arange(seq)
    query_at, key_at = position[None, :, None], position[None, None, :]  # i, k
    queries = mask  # (B, T)
    following = mask & np.pad(mask[:, 1:], ((0, 0), (0, 1)))
    same = (input_ids[:, :, None] == input_ids[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    duplicate = same & (key_at < query_at)  # key k < query i
    induction = np.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]
    induction &= mask[:, None, :]
    classes = np.zeros((3, batch, seq), bool)
    if tokens is not None:
        tokens = np.asarray(tokens, dtype=object)
        if not causal:  # a decoder has no [CLS]/[SEP]: its "<s>" is the position-0 sink
            classes[0] = np.isin(tokens, ["[CLS]", "<s>"]) & mask
            classes[1] = np.isin(tokens, ["[SEP]", "</s>"]) & mask
        stripped = np.vectorize(lambda t: t[1:] if t[:1] in ("Ġ", "▁") and len(t) > 1 else t)(tokens)
        classes[2] = np.isin(stripped, [".", ","]) & mask
    distance = np.abs(position[:, None] - position[None, :]).astype(dtype)

    def mean(values, selector):  # values (B, H, T), selector (B, T) -> (H,)
        weights = selector[:, None, :].astype(dtype)
        count = selector.sum()
        return (values * weights).sum((0, 2)) / count if count else np.full(heads, np.nan)

    out = {name: np.zeros((num_layers, heads)) for name in SCORES}
    for layer in range(num_layers):
        window = windows[layer]
        inside = np.ones((1, seq, seq), bool) if window is None else key_at > query_at - window  # (1, T, T)
        visible = mask[:, None, :] & inside
        if causal:
            visible = visible & (key_at <= query_at)  # (B, T, T)
        n_visible = visible.sum(-1)  # (B, T)
        spread = mask & (n_visible >= 2)
        previous = mask & np.pad(visible[:, position[1:], position[1:] - 1], ((0, 0), (1, 0)))  # i - 1 visible
        first = mask & inside[:, :, 0]  # key 0 inside the window
        repeat = mask & (duplicate & inside).any(-1)  # an earlier copy inside the window
        successor = np.zeros_like(inside)
        successor[:, :, :-1] = inside[:, :, 1:]  # [i, j]: key j + 1 inside the window (j < i)
        repeat_next = mask & (duplicate & successor).any(-1)  # ... an earlier copy whose next key is
        p = attention[layer]  # (B, H, T, T)
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        entropy = -plogp.sum(-1)
        out["entropy"][layer] = mean(entropy, queries)
        out["normalized_entropy"][layer] = mean(entropy / np.log(np.maximum(n_visible, 2))[:, None], spread)
        out["max_weight"][layer] = mean(p.max(-1), queries)
        out["self"][layer] = mean(np.einsum("bhii->bhi", p), queries)
        prev = np.zeros((batch, heads, seq), dtype)
        prev[..., 1:] = p[..., position[1:], position[1:] - 1]
        out["previous_token"][layer] = mean(prev, previous)
        nxt = np.zeros((batch, heads, seq), dtype)
        nxt[..., :-1] = p[..., position[:-1], position[:-1] + 1]
        out["next_token"][layer] = mean(nxt, following)
        out["first_token"][layer] = mean(p[..., 0], first)
        for index, name in enumerate(("cls", "sep", "punctuation")):
            if classes[index].any():
                out[name][layer] = mean((p * classes[index][:, None, None, :]).sum(-1), queries)
            else:
                out[name][layer] = np.nan
        out["mean_distance"][layer] = mean((p * distance).sum(-1), queries)
        out["induction"][layer] = mean((p * induction[:, None]).sum(-1), repeat_next)
        out["duplicate"][layer] = mean((p * duplicate[:, None]).sum(-1), repeat)
    return out


def reference_rollout(attention, residual=True):
    """Abnar & Zuidema 2020 rollout of one sequence: attention (L, H, n, n) -> (L, n, n)."""
    attention = np.asarray(attention, np.float64)
    joint = []
    for layer in range(attention.shape[0]):
        a = attention[layer].mean(0)
        if residual:
            a = a + np.eye(a.shape[0])
            a = a / a.sum(-1, keepdims=True)
        joint.append(a if not joint else a @ joint[-1])
    return np.stack(joint)


def reference_max_flow(capacity, source, sink):
    """Edmonds-Karp on a dense capacity matrix (BFS shortest augmenting paths)."""
    residual = np.array(capacity, np.float64)
    total = 0.0
    while True:
        parent = {source: None}
        queue = deque([source])
        while queue and sink not in parent:
            node = queue.popleft()
            for nxt in np.flatnonzero(residual[node] > 1e-12):
                if nxt not in parent:
                    parent[int(nxt)] = node
                    queue.append(int(nxt))
        if sink not in parent:
            return total
        path, node = [], sink
        while parent[node] is not None:
            path.append((parent[node], node))
            node = parent[node]
        push = min(residual[u, v] for u, v in path)
        for u, v in path:
            residual[u, v] -= push
            residual[v, u] += push
        total += push


def reference_flow(attention, residual=True):
    """The paper's attention flow of one sequence, attention (L, H, n, n) -> (n, n).

    Nodes (l, i) for l = 0..L, edge (l, i) -> (l - 1, j) with capacity A_l[i, j]; one
    max-flow per (output node, input node) pair, then each row normalised (as in
    samiraabnar/attention_flow's compute_flows, for the last layer).
    """
    attention = np.asarray(attention, np.float64)
    num_layers, _, n, _ = attention.shape
    capacity = np.zeros(((num_layers + 1) * n,) * 2)
    for layer in range(1, num_layers + 1):
        a = attention[layer - 1].mean(0)
        if residual:
            a = a + np.eye(n)
            a = a / a.sum(-1, keepdims=True)
        capacity[layer * n:(layer + 1) * n, (layer - 1) * n:layer * n] = a
    values = np.array([
        [reference_max_flow(capacity, num_layers * n + i, j) for j in range(n)] for i in range(n)
    ])
    return values, values / values.sum(-1, keepdims=True)


def _js(p, q):
    m = 0.5 * (p + q)

    def h(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0).sum(-1)

    return np.maximum(h(m) - 0.5 * (h(p) + h(q)), 0.0)


def _cosine(p, q):
    return (p * q).sum(-1) / np.sqrt((p * p).sum(-1) * (q * q).sum(-1))


def reference_similarity(maps, mask, metric="jsd", dtype=np.float64):
    """maps (N, B, T, T) -> (N, N) mean over non-padding queries of the row metric."""
    maps = np.asarray(maps, dtype)
    mask = np.asarray(mask, bool)
    stat = _js if metric == "jsd" else _cosine
    out = np.zeros((len(maps), len(maps)))
    for a in range(len(maps)):
        for b in range(len(maps)):
            out[a, b] = stat(maps[a][mask], maps[b][mask]).mean()
    return out


def reference_anomaly_scores(attention, mask, input_ids, tokens=None, *, mass=0.98, window=2, decisive=0.5,
                             windows=None, min_concentrated=12, min_jump=16):
    """Per-head (L, H) concentrated share and jump score (attnjax/analysis/anomalies.py).

    concentrated: share of non-padding queries with top-2 mass >= ``mass`` whose argmax is
    position 0, a special token, or the head's most frequent argmax in that sequence.
    jump: mean over adjacent query pairs of |argmax step| / span (the sequence's tokens,
    or the layer's sliding window from ``windows`` if smaller), counting only pairs of
    decisive queries (max weight >= ``decisive``) whose argmaxes are not both explained.
    Both average only over sequences whose span is at least ``min_concentrated`` /
    ``min_jump`` tokens (NaN if none is).
    """
    attention = np.asarray(attention, np.float64)
    mask = np.asarray(mask, bool)
    num_layers, batch, heads, seq, _ = attention.shape
    ordered = np.sort(attention, axis=-1)
    top2 = ordered[..., -1] + ordered[..., -2]  # (L, B, H, T)
    argmax = attention.argmax(-1)  # (L, B, H, T)
    special = np.zeros((batch, seq), bool)
    if tokens is not None:
        special = np.isin(np.asarray(tokens, object), ["[CLS]", "[SEP]", "<s>", "</s>"])
    lengths = mask.sum(-1)

    def span(layer, b):
        n = int(lengths[b])
        return n if windows is None or windows[layer] is None else min(n, windows[layer])

    concentrated = np.zeros((num_layers, heads))
    queries = np.zeros(num_layers)
    for layer in range(num_layers):
        for b in range(batch):
            if span(layer, b) < min_concentrated:
                continue
            queries[layer] += mask[b].sum()
            for head in range(heads):
                keys = argmax[layer, b, head][mask[b]]
                modal = np.bincount(keys, minlength=seq).argmax()  # first most frequent key
                for i in np.flatnonzero(mask[b]):
                    k = argmax[layer, b, head, i]
                    fixed = k == 0 or special[b, k] or k == modal
                    concentrated[layer, head] += top2[layer, b, head, i] >= mass and fixed
    with np.errstate(invalid="ignore"):
        concentrated /= queries[:, None]
    ids = np.asarray(input_ids)
    jump = np.zeros((num_layers, heads))
    pairs = np.zeros(num_layers)
    for b in range(batch):
        for i in range(seq - 1):
            if not (mask[b, i] and mask[b, i + 1]):
                continue
            for layer in range(num_layers):
                if span(layer, b) < min_jump:
                    continue
                pairs[layer] += 1
                for head in range(heads):
                    k0, k1 = argmax[layer, b, head, i], argmax[layer, b, head, i + 1]

                    def explained(query, key):
                        earlier = [j for j in range(query) if mask[b, j] and ids[b, j] == ids[b, query]]
                        return (abs(key - query) <= window or key == 0 or special[b, key]
                                or key in earlier or key - 1 in earlier)

                    weights = attention[layer, b, head]
                    if weights[i].max() < decisive or weights[i + 1].max() < decisive:
                        continue
                    if not (explained(i, k0) and explained(i + 1, k1)):
                        jump[layer, head] += abs(k1 - k0) / span(layer, b)
    with np.errstate(invalid="ignore"):
        return concentrated, jump / pairs[:, None]


# ----------------------------------------------------------------------------------
# The references themselves, on inputs small enough to check by hand.


def test_reference_scores_by_hand():
    # One head over 3 tokens [CLS] a a: query rows chosen so each score is easy to read.
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])[None, None, None]
    scores = reference_head_scores(p, np.ones((1, 3), bool), np.array([[1, 7, 7]]), [["[CLS]", "a", "a"]])
    assert scores["previous_token"][0, 0] == pytest.approx((0.5 + 1.0) / 2)  # queries 1, 2
    assert scores["self"][0, 0] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert scores["cls"][0, 0] == pytest.approx((1.0 + 0.5) / 3)
    assert scores["duplicate"][0, 0] == pytest.approx(1.0)  # query 2 looks at its earlier copy
    assert scores["induction"][0, 0] == pytest.approx(0.0)  # ... not at the token after it (itself)
    assert np.isnan(scores["sep"][0, 0])


def test_reference_max_flow_by_hand():
    # s -> a (2), s -> b (1), a -> t (1), b -> t (3), a -> b (1): max flow 3.
    capacity = np.zeros((4, 4))
    capacity[0, 1], capacity[0, 2], capacity[1, 3], capacity[2, 3], capacity[1, 2] = 2, 1, 1, 3, 1
    assert reference_max_flow(capacity, 0, 3) == pytest.approx(3.0)
