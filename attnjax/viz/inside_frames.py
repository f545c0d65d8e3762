"""Trace -> the DataFrames of the views inside one head (data shaping, no charts).

- ``head_view_frames``: the query -> key lines of BertViz's head view (Vig 2019);
- ``attention_step_frames``: one query's attention, stage by stage, recomputed from the
  recorded q, k, v (Capture(qkv=True)) exactly as attnjax.kernels.reference does;
- ``qk_embedding_frames``: queries and keys of a head in one 2-D embedding (PCA or
  t-SNE, attnjax.viz.embedding) after AttentionViz's key translation and norm scaling
  (Yeh et al. 2023).

Positions are 0-based token positions; padding is left out.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from attnjax.trace import Trace
from attnjax.viz.embedding import pca_2d, tsne_2d, tsne_perplexity
from attnjax.viz.frames import sequence_tokens, truncate

# The head view draws every query -> key line up to this many tokens; above it only
# each query's top_k keys (DEFAULT_TOP_K unless given), and says so.
HEAD_VIEW_MAX_TOKENS = 32
DEFAULT_TOP_K = 5
# Lines in one head view (all layers and heads it carries), about 3 MB of spec.
HEAD_VIEW_MAX_LINES = 120_000
# The step-by-step view shows at most this many keys (the highest weights) in its vector
# panels; every number is still computed over all the keys.
STEPS_MAX_KEYS = 48
EMBEDDING_METHODS = ("pca", "tsne")  # viz.embedding: pca_2d, tsne_2d
VISIBLE_SPACE = "\u2423"  # labels show a decoder token's spaces (" the" -> "\u2423the")


def layer_position(trace: Trace, layer: int, what: str) -> int:
    """Position of model layer ``layer`` on the Trace's L axis, checked."""
    recorded = list(trace.layers)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in recorded:
        raise ValueError(f"{what}: layer={layer!r} is not in this Trace, which holds layers {tuple(recorded)}; "
                         "record it with Capture(layers=...).")
    return recorded.index(int(layer))


def check_sequence(trace: Trace, sequence: int, what: str) -> int:
    if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)) \
            or not 0 <= int(sequence) < trace.batch_size:
        raise ValueError(f"{what}: sequence={sequence!r} is out of range; the Trace holds "
                         f"{trace.batch_size} (0..{trace.batch_size - 1}).")
    return int(sequence)


def check_head(head, num_heads: int, what: str) -> int:
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= int(head) < num_heads:
        raise ValueError(f"{what}: head={head!r} is out of range; the model has {num_heads} heads (0..{num_heads - 1}).")
    return int(head)


def require_qkv(trace: Trace, what: str) -> None:
    if not isinstance(trace, Trace):
        raise TypeError(f"{what} takes an attnjax Trace; got {type(trace).__name__}.")
    if trace.queries is None or trace.keys is None or trace.values is None:
        raise ValueError(f"{what} needs the queries, keys and values; run the model with "
                         "Capture(qkv=True) (e.g. attnjax.run(model, text, capture=Capture(qkv=True))).")


def token_table(trace: Trace, sequence: int) -> pd.DataFrame:
    """position, token (whole), label (truncated, spaces shown as \u2423) of the non-padding tokens."""
    positions, tokens = sequence_tokens(trace, sequence)
    return pd.DataFrame({"position": positions.astype(np.int64), "token": list(tokens),
                         "label": [truncate(str(t).replace(" ", VISIBLE_SPACE)) for t in tokens]})


def head_view_frames(trace: Trace, layers: Optional[Sequence[int]] = None, *, sequence: int = 0,
                     top_k: Optional[int] = None) -> Tuple[pd.DataFrame, pd.DataFrame, Dict]:
    """(lines, tokens, info) for the head view.

    lines: layer, head, query, key, weight: one row per query -> key line with weight > 0
    (invisible keys have weight exactly 0 and draw nothing). Up to HEAD_VIEW_MAX_TOKENS
    tokens every line is kept; above, or when ``top_k`` is given, only each query's
    ``top_k`` heaviest keys. info: tokens, top_k (None when every line is kept).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"head_view takes an attnjax Trace; got {type(trace).__name__}.")
    if trace.attention is None:
        raise ValueError("head_view needs attention maps; run the model with Capture(attention=True).")
    sequence = check_sequence(trace, sequence, "head_view")
    recorded = list(trace.layers) or list(range(trace.attention.shape[0]))
    layers = recorded if layers is None else [int(layer) for layer in layers]
    rows = [layer_position(trace.replace(layers=tuple(recorded)), layer, "head_view") for layer in layers]
    tokens = token_table(trace, sequence)
    positions = tokens["position"].to_numpy()
    n = len(positions)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"head_view(top_k={top_k!r}): give a positive number of keys per query, or None.")
    keep = int(top_k) if top_k is not None else (DEFAULT_TOP_K if n > HEAD_VIEW_MAX_TOKENS else None)
    if keep is not None and keep >= n:
        keep = None
    attention = np.asarray(trace.attention)[:, sequence].astype(np.float32)          # (L, H, T, T)
    maps = attention[np.ix_(rows, range(attention.shape[1]), positions, positions)]  # (L', H, n, n)
    if keep is not None:
        cutoff = -np.sort(-maps, axis=-1)[..., keep - 1:keep]                       # (L', H, n, 1)
        maps = np.where(maps >= cutoff, maps, 0.0)  # ties at the cutoff may keep a few more
    li, hi, qi, ki = np.nonzero(maps > 0)
    if len(li) > HEAD_VIEW_MAX_LINES:
        raise ValueError(f"The head view would draw {len(li):,} lines, over its budget of {HEAD_VIEW_MAX_LINES:,}; "
                         "pass layer=... (one layer), or a smaller top_k.")
    lines = pd.DataFrame({
        "layer": np.asarray(layers, np.int64)[li], "head": hi.astype(np.int64),
        "query": positions[qi], "key": positions[ki], "weight": maps[li, hi, qi, ki],
    })
    return lines, tokens, {"tokens": n, "top_k": keep, "heads": attention.shape[1], "layers": list(layers)}


def _visible(trace: Trace, layer_index: int, query: int, keys: np.ndarray) -> np.ndarray:
    """(n,) bool: which of ``keys`` (non-padding positions) query ``query`` may see."""
    seen = np.ones(keys.shape, bool)
    if trace.causal:
        seen &= keys <= query
    window = trace.windows[layer_index] if trace.windows else None
    if window is not None:
        seen &= keys > query - window
    return seen


def _scale(trace: Trace, layer_index: int) -> float:
    if trace.scales:
        return float(trace.scales[layer_index])
    return 1.0 / np.sqrt(trace.queries.shape[-1])


def _head_vectors(trace: Trace, index: int, sequence: int, head: int, positions: np.ndarray):
    """q (n, D), k (n, D), v (n, D) of one query head over the non-padding positions."""
    heads, kv_heads = trace.queries.shape[2], trace.keys.shape[2]
    kv_head = head // (heads // kv_heads)
    # Index in numpy: a JAX index op compiles once per shape (~0.1 s each on a CPU).
    q = np.asarray(trace.queries)[index, sequence, head][positions].astype(np.float64)   # (n, D)
    k = np.asarray(trace.keys)[index, sequence, kv_head][positions].astype(np.float64)   # (n, D)
    v = np.asarray(trace.values)[index, sequence, kv_head][positions].astype(np.float64)  # (n, D)
    return q, k, v, kv_head


def _softmax_row(logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
    if not seen.any():
        return np.zeros_like(logits)
    shifted = np.where(seen, logits - logits[seen].max(), -np.inf)
    weights = np.exp(shifted)
    return weights / weights.sum()


def attention_step_frames(trace: Trace, layer: int, head: int, query: int, *,
                          sequence: int = 0) -> Dict[str, object]:
    """One query's attention recomputed stage by stage from Capture(qkv=True).

    Returns a dict: ``keys`` (key, token, label, dot = q.k, scaled = scale * dot,
    capped (= scaled without a soft-cap; c tanh(scaled / c) with one), visible,
    masked (capped, NaN where invisible: -inf in the softmax), weight = softmax,
    shown: among the keys drawn), ``vectors`` (row, kind "q"/"k", position, dim, value),
    ``values`` (key, dim, value, weighted = weight * value), ``output`` (dim, value =
    sum over keys of weight * v), and ``info`` (scale, softcap, kv_head, query token...).
    """
    what = "attention_steps"
    require_qkv(trace, what)
    index = layer_position(trace, layer, what)
    sequence = check_sequence(trace, sequence, what)
    head = check_head(head, trace.queries.shape[2], what)
    tokens = token_table(trace, sequence)
    positions = tokens["position"].to_numpy()
    if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or int(query) not in set(positions):
        raise ValueError(f"{what}: query={query!r} is not a token position of sequence {sequence}; its tokens are "
                         f"at {int(positions[0])}..{int(positions[-1])}.")
    query = int(query)
    q, k, v, kv_head = _head_vectors(trace, index, sequence, head, positions)
    q_row = q[list(positions).index(query)]                                            # (D,)
    scale, cap = _scale(trace, index), (trace.softcaps[index] if trace.softcaps else None)
    dot = k @ q_row                                                                    # (n,)
    scaled = dot * scale
    capped = cap * np.tanh(scaled / cap) if cap is not None else scaled
    seen = _visible(trace, index, query, positions)
    weight = _softmax_row(capped, seen)                                                # (n,)
    output = weight @ v                                                                # (D,)
    shown = np.zeros(len(positions), bool)
    order = np.argsort(-weight, kind="stable")[:STEPS_MAX_KEYS]
    shown[order] = True
    keys = tokens.assign(key=positions, dot=dot, scaled=scaled, capped=capped, visible=seen,
                         masked=np.where(seen, capped, np.nan), weight=weight, shown=shown)
    keys = keys.drop(columns="position")[["key", "token", "label", "dot", "scaled", "capped", "visible",
                                          "masked", "weight", "shown"]]
    dims = np.arange(q.shape[1])
    kept = positions[shown]
    label = dict(zip(positions, tokens["label"]))
    vectors = pd.concat([
        pd.DataFrame({"row": f"q {query} {label[query]}", "kind": "q", "position": query, "dim": dims,
                      "value": q_row}),
        *[pd.DataFrame({"row": f"k {p} {label[p]}", "kind": "k", "position": p, "dim": dims,
                        "value": k[list(positions).index(p)]}) for p in kept],
    ], ignore_index=True)
    weighted = pd.concat([
        pd.DataFrame({"key": p, "row": f"{weight[i]:.3f} \u00d7 v {p} {label[p]}", "dim": dims, "value": v[i],
                      "weighted": weight[i] * v[i]})
        for i, p in enumerate(positions) if shown[i]
    ], ignore_index=True)
    info = {"layer": int(layer), "head": head, "kv_head": kv_head, "query": query,
            "query_token": str(tokens["token"].iloc[list(positions).index(query)]), "scale": scale, "softcap": cap,
            "head_dim": int(q.shape[1]), "keys": len(positions), "shown": int(shown.sum()),
            "kv_heads": int(trace.keys.shape[2]), "heads": int(trace.queries.shape[2])}
    return {"keys": keys, "vectors": vectors, "values": weighted,
            "output": pd.DataFrame({"dim": dims, "value": output}), "info": info}


def attentionviz_normalise(q: np.ndarray, k: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    """AttentionViz's key translation and norm scaling (Yeh et al. 2023, section 4.1).

    q: (n, D) queries, k: (m, D) keys. Keys are translated so their mean equals the
    queries' mean, k_t = k - mean(k) + mean(q), which adds q.(mean(q) - mean(k)) to every
    score of query q: a constant per query, so the softmax is unchanged. Then
    c = sqrt(mean ||k_t|| / mean ||q||), q' = c q and k' = k_t / c, so the two sets have
    the same mean norm and every dot product q'.k' equals q.k_t. Returns (q', k', c).
    """
    k_t = k - k.mean(axis=0, keepdims=True) + q.mean(axis=0, keepdims=True)           # (m, D)
    q_norm = np.linalg.norm(q, axis=1).mean()
    k_norm = np.linalg.norm(k_t, axis=1).mean()
    c = float(np.sqrt(k_norm / q_norm)) if q_norm > 0 and k_norm > 0 else 1.0
    return q * c, k_t / c, c


def qk_embedding_frames(trace: Trace, layer: int, heads: Sequence[int], *, sequence: int = 0,
                        method: str = "pca") -> Tuple[pd.DataFrame, pd.DataFrame, Dict]:
    """(points, pairs, info) of the query/key map of each head in ``heads``.

    points: head, kind ("query"/"key"), position, token, label, x, y (the 2-D embedding
    of that head's normalised queries and keys together, attentionviz_normalise then
    ``method``); pairs: head, query, key, weight, x, y, x2, y2: each query's most
    attended key (softmax recomputed from q, k as attention_step_frames does).
    """
    what = "qk_embedding"
    require_qkv(trace, what)
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"{what}(method={method!r}): choose one of {EMBEDDING_METHODS}.")
    index = layer_position(trace, layer, what)
    sequence = check_sequence(trace, sequence, what)
    tokens = token_table(trace, sequence)
    positions = tokens["position"].to_numpy()
    scale, cap = _scale(trace, index), (trace.softcaps[index] if trace.softcaps else None)
    point_frames, pair_frames, shares = [], [], {}
    for head in heads:
        head = check_head(head, trace.queries.shape[2], what)
        q, k, _, _ = _head_vectors(trace, index, sequence, head, positions)
        q_n, k_n, _ = attentionviz_normalise(q, k)
        joint = np.concatenate([q_n, k_n])                                            # (2n, D)
        if method == "pca":
            coords, shares[head] = pca_2d(joint)                                      # (2n, 2)
        else:
            coords = tsne_2d(joint, seed=head)                                        # (2n, 2)
        n = len(positions)
        point_frames.append(pd.DataFrame({
            "head": head, "kind": ["query"] * n + ["key"] * n, "position": np.tile(positions, 2),
            "token": list(tokens["token"]) * 2, "label": list(tokens["label"]) * 2,
            "x": coords[:, 0], "y": coords[:, 1]}))
        logits = (q @ k.T) * scale                                                    # (n, n)
        if cap is not None:
            logits = cap * np.tanh(logits / cap)
        rows = []
        for i, query in enumerate(positions):
            weights = _softmax_row(logits[i], _visible(trace, index, int(query), positions))
            j = int(np.argmax(weights))
            rows.append((head, int(query), int(positions[j]), float(weights[j]),
                         coords[i, 0], coords[i, 1], coords[n + j, 0], coords[n + j, 1]))
        pair_frames.append(pd.DataFrame(rows, columns=["head", "query", "key", "weight", "x", "y", "x2", "y2"]))
    info = {"layer": int(layer), "method": method, "variance": shares, "tokens": len(positions),
            "perplexity": tsne_perplexity(2 * len(positions)) if method == "tsne" else None}
    return pd.concat(point_frames, ignore_index=True), pd.concat(pair_frames, ignore_index=True), info

