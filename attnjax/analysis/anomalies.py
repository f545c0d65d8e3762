"""Heads and layers whose attention looks wrong, with the reason.

Four kinds, each a score per head (or per layer) against a threshold:

- over-dispersed (per head): mean normalized entropy (head_scores's
  normalized_entropy: entropy / ln(visible keys), 1 = uniform) >= ``dispersed``.
  Attention this close to uniform averages the values and carries no positional or
  content signal.
- over-concentrated (per head): the fraction of queries that put at least
  ``concentrated_mass`` on their two largest weights *and* whose argmax is a fixed key
  (position 0, a [CLS]/[SEP] token, or the key the head's argmax lands on most often in
  that sequence) is >= ``concentrated_fraction``: the head is dead or a sink (Clark et
  al. 2019's no-op attention to [CLS]/[SEP]; Xiao et al. 2023's attention sinks). A
  sharp previous-token head also has all its mass on one key, but a different key per
  query, so it is not flagged. The detail names the key most of those queries attend to.
  From streaming stats (no maps) only the largest weight is known; it is used in place
  of the top two (a lower bound, so fewer heads are flagged).
- jumping (per head): the mean over adjacent query pairs (i, i + 1) of
  |argmax(i + 1) - argmax(i)| / (tokens in the sequence), where a pair counts only when
  both queries are decisive (max weight >= ``decisive``: the argmax of a broad row is
  noise, and broad heads are the over-dispersed kind's business) and not both argmaxes
  are *explained*. An argmax k of query i is explained when it is
  local (|k - i| <= ``local_window``: previous/self/next-token patterns), a sink
  (position 0 or a [CLS]/[SEP] token), or content-following (k holds the same token as
  i, or follows an earlier copy of it: duplicate/induction patterns of Olsson et al.
  2022; read from input_ids, so it works from stats too). A decisive head whose argmax
  lands uniformly at random scores about 1/3; local, sink and induction heads score ~0.
- layer inconsistency (per layer, head = -1): for each interior layer l, the JS
  divergence to its closer neighbour, min(JS(l-1, l), JS(l, l+1)) (layer_similarity),
  as a robust z-score against all adjacent-layer divergences:
  z = (d_l - median) / max(1.4826 * MAD, 0.1 * median). Flagged when z >= ``layer_z``
  (3.5, the usual cut for modified z-scores, Iglewicz & Hoaglin 1993). First and last
  layers have one neighbour and are not judged.

Default thresholds were chosen from measurements on the bundled all-MiniLM-L6-v2 (see
``AnomalyThresholds`` and benchmarks/RESULTS.md): each sits clearly beyond the bulk of
that model's 72 heads, so a healthy model flags a few heads and an unhealthy one (a
randomly initialised or a uniform head) stands out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attnjax.analysis._common import (
    ALL_HEADS,
    TraceOrTraces,
    as_traces,
    earlier_matches,
    has_attention,
    layer_ids,
    token_classes,
    token_strings,
    validate_attention,
)
from attnjax.analysis._terms import attention_focus_terms
from attnjax.analysis.scores import stats_terms
from attnjax.analysis.similarity import layer_similarity

KINDS = ("over-dispersed", "over-concentrated", "jumping", "layer inconsistency")


@dataclasses.dataclass(frozen=True)
class AnomalyThresholds:
    """Thresholds of detect_anomalies, chosen from measurements (benchmarks/RESULTS.md).

    Measured on all-MiniLM-L6-v2 (72 heads; the 64 benchmark texts at 128 tokens, and an
    encyclopedic paragraph), healthy: mean normalized entropy 0.002-0.965 over heads
    (the broadest are layer 0's); share of concentrated queries on a fixed key at most
    0.53; jump score at most 0.10 once only decisive queries count; layer z-scores at
    most 0.0. The same model with random query/key weights (near-uniform attention):
    normalized entropy >= 0.997 for every head. Each default sits between the two.
    """

    dispersed: float = 0.98              # mean normalized entropy, at least
    concentrated_mass: float = 0.9       # top-2 mass of one query, at least ...
    concentrated_fraction: float = 0.8   # ... for at least this share of queries ("most")
    jump: float = 0.15                   # mean unexplained |argmax step| / tokens, at least
    decisive: float = 0.5                # a query's argmax counts for jumping when its weight >= this
    local_window: int = 2                # |argmax - query| <= this counts as local
    layer_z: float = 3.5                 # robust z of a layer's divergence from its neighbours


def resolve_anomaly_thresholds(thresholds) -> AnomalyThresholds:
    if thresholds is None:
        return AnomalyThresholds()
    if isinstance(thresholds, AnomalyThresholds):
        return thresholds
    fields = {field.name for field in dataclasses.fields(AnomalyThresholds)}
    unknown = sorted(set(thresholds) - fields)
    if unknown:
        raise ValueError(f"Unknown anomaly thresholds {unknown}; valid names are {sorted(fields)}.")
    return AnomalyThresholds(**dict(thresholds))


@functools.partial(jax.jit, static_argnames=("local_window",))
def _head_sums(max_weight, top2, argmax, mask, input_ids, special, *, local_window, concentrated_mass, decisive):
    """Sums over queries (L, H) of every per-head anomaly score, and the counts.

    max_weight, top2 (L, B, H, T) float32; argmax (L, B, H, T) int32;
    mask, input_ids (B, T); special (B, T) bool: [CLS]/[SEP] keys.
    """
    mask = mask.astype(bool)
    seq = mask.shape[1]
    n_tokens = mask.sum(-1).astype(jnp.float32)  # (B,)
    position = jnp.arange(seq)
    duplicate, induction = earlier_matches(input_ids, mask)  # (B, T, T)
    content = duplicate | induction  # (B, T, T)
    sequence = jnp.arange(mask.shape[0])[None, :, None, None]  # (1, B, 1, 1)

    # explained[l, b, h, i]: query i's argmax is local, a sink, or content-following
    local = jnp.abs(argmax - position[None, None, None, :]) <= local_window  # (L, B, H, T)
    sink = (argmax == 0) | special[sequence, argmax]  # (L, B, H, T)
    counts = jnp.zeros(argmax.shape, jnp.float32).at[  # (L, B, H, T) queries whose argmax is each key
        jnp.arange(argmax.shape[0])[:, None, None, None], sequence,
        jnp.arange(argmax.shape[2])[None, None, :, None], argmax,
    ].add(jnp.broadcast_to(mask[None, :, None, :], argmax.shape).astype(jnp.float32))
    modal = jnp.argmax(counts, axis=-1)[..., None]  # (L, B, H, 1) the head's favourite key per sequence
    fixed = sink | (argmax == modal)  # (L, B, H, T) argmax on a sink or on the head's fixed key
    follows = content[sequence, position[None, None, None, :], argmax]  # (L, B, H, T)
    explained = local | sink | follows  # (L, B, H, T)
    step = jnp.abs(argmax[..., 1:] - argmax[..., :-1]).astype(jnp.float32)  # (L, B, H, T-1)
    both = explained[..., 1:] & explained[..., :-1]  # (L, B, H, T-1)
    focused = max_weight >= decisive  # (L, B, H, T) the argmax means something
    counted = focused[..., 1:] & focused[..., :-1] & ~both  # (L, B, H, T-1)
    pair = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)  # (B, T-1)
    jump = jnp.where(counted, step, 0.0) / jnp.maximum(n_tokens, 1.0)[None, :, None, None]  # (L, B, H, T-1)

    query = mask.astype(jnp.float32)  # (B, T)
    return {
        "jump": jnp.einsum("LBHQ,BQ->LH", jump, pair),
        "pairs": pair.sum(),
        "concentrated": jnp.einsum("LBHQ,BQ->LH", ((top2 >= concentrated_mass) & fixed).astype(jnp.float32), query),
        "queries": query.sum(),
    }


def detect_anomalies(
    trace: TraceOrTraces,
    thresholds=None,
    *,
    similarity: Optional[pd.DataFrame] = None,
    flagged_only: bool = True,
) -> pd.DataFrame:
    """Flag over-dispersed, over-concentrated and jumping heads, and inconsistent layers.

    trace: a Trace or a list of Traces (a corpus); full maps or streaming stats.
    thresholds: AnomalyThresholds or a dict overriding some of its fields.
    similarity: a layer_similarity(trace, "jsd") frame to reuse (computed if None).
    flagged_only: return only flagged rows (default) or every evaluated row.

    Columns: layer (int), head (int; -1 for a whole-layer row), kind (str, one of
    KINDS), score (float), threshold (float), flagged (bool), detail (str: why, in words).
    Definitions in the module docstring.
    """
    limits = resolve_anomaly_thresholds(thresholds)
    traces = as_traces(trace)
    first = traces[0]
    ids = layer_ids(first)
    totals = None
    entropy_sum = None
    entropy_count = 0.0
    kept = []
    for item in traces:
        classes, _ = token_classes(item)
        if has_attention(item):
            terms = attention_focus_terms(item.attention, item.mask, causal=item.causal)
            validate_attention(item, terms)
        else:
            terms = stats_terms(item.stats, item.mask, jnp.asarray(classes), causal=item.causal)
        special = (classes[..., 0] + classes[..., 1]) > 0  # (B, T)
        sums = _head_sums(
            terms["max_weight"], terms["top2"], terms["argmax"], item.mask, item.input_ids,
            jnp.asarray(special), local_window=int(limits.local_window),
            concentrated_mass=float(limits.concentrated_mass), decisive=float(limits.decisive),
        )
        sums = {name: np.asarray(value, np.float64) for name, value in jax.device_get(sums).items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        mask = np.asarray(item.mask, bool)
        n_visible = _visible_counts(mask, item.causal)
        eligible = mask & (n_visible >= 2)  # (B, T)
        normalized = np.asarray(terms["normalized_entropy"], np.float64)  # (L, B, H, T)
        part = np.einsum("lbhq,bq->lh", normalized, eligible.astype(np.float64))
        entropy_sum = part if entropy_sum is None else entropy_sum + part
        entropy_count += float(eligible.sum())
        kept.append((item, np.asarray(terms["argmax"]), np.asarray(terms["top2"])))

    rows = []
    num_heads = first.num_heads
    dispersed = entropy_sum / max(entropy_count, 1.0)
    concentrated = totals["concentrated"] / max(totals["queries"], 1.0)
    jumping = totals["jump"] / max(totals["pairs"], 1.0)
    heads_to_describe = list(zip(*np.nonzero(concentrated >= limits.concentrated_fraction)))
    sink_counts = {}
    for item, argmax, top2 in kept:
        sink_counts = _merge_counts(sink_counts, _sink_targets(item, argmax, top2, limits, heads_to_describe))
    top2_name = "top-2 mass" if has_attention(first) else "max weight (stats: top-1 only)"
    for position, layer in enumerate(ids):
        for head in range(num_heads):
            value = float(dispersed[position, head])
            rows.append((layer, head, "over-dispersed", value, limits.dispersed, value >= limits.dispersed,
                         f"mean normalized entropy {value:.3f} >= {limits.dispersed:g}: attention is close "
                         "to uniform over the visible keys"))
            value = float(concentrated[position, head])
            target = _describe_target(sink_counts.get((position, head)))
            rows.append((layer, head, "over-concentrated", value, limits.concentrated_fraction,
                         value >= limits.concentrated_fraction,
                         f"{100 * value:.0f}% of queries put >= {limits.concentrated_mass:g} of their "
                         f"attention ({top2_name}) on one or two keys, led by a sink or fixed key"
                         f"{target}: a dead or sink head"))
            value = float(jumping[position, head])
            rows.append((layer, head, "jumping", value, limits.jump, value >= limits.jump,
                         f"the argmax moves {value:.3f} of the sequence per query step on average, in "
                         "steps neither local (previous/self/next token), to a sink, nor "
                         "content-following (duplicate/induction)"))
    rows.extend(_layer_rows(traces, ids, limits, similarity))
    frame = pd.DataFrame(rows, columns=["layer", "head", "kind", "score", "threshold", "flagged", "detail"])
    frame = frame.astype({"layer": np.int64, "head": np.int64, "score": np.float64,
                          "threshold": np.float64, "flagged": bool})
    if flagged_only:
        frame = frame[frame["flagged"]].reset_index(drop=True)
    return frame


def _visible_counts(mask: np.ndarray, causal: bool) -> np.ndarray:
    if causal:
        return np.cumsum(mask, axis=1) * mask
    return np.broadcast_to(mask.sum(1, keepdims=True), mask.shape)


def _sink_targets(trace, argmax: np.ndarray, top2: np.ndarray, limits, heads) -> dict:
    """For (layer position, head) in heads: how often each key is the argmax of a concentrated query.

    Keys are labelled by position, with the token when every sequence has the same one there.
    """
    mask = np.asarray(trace.mask, bool)
    tokens = token_strings(trace)
    counts = {}
    for layer, head in heads:
        chosen = (top2[layer, :, head] >= limits.concentrated_mass) & mask  # (B, T)
        if not chosen.any():
            continue
        keys, numbers = np.unique(argmax[layer, :, head][chosen], return_counts=True)
        labels = {}
        for key, number in zip(keys.tolist(), numbers.tolist()):
            label = f"position {key}"
            if tokens is not None:
                names = set(tokens[mask[:, key], key].tolist()) if mask[:, key].any() else set()
                if len(names) == 1:
                    label += f" {names.pop()!r}"
            labels[label] = labels.get(label, 0) + number
        counts[(int(layer), int(head))] = labels
    return counts


def _merge_counts(left: dict, right: dict) -> dict:
    merged = {key: dict(value) for key, value in left.items()}
    for key, value in right.items():
        slot = merged.setdefault(key, {})
        for label, number in value.items():
            slot[label] = slot.get(label, 0) + number
    return merged


def _describe_target(counts: Optional[dict]) -> str:
    if not counts:
        return ""
    label, number = max(counts.items(), key=lambda item: item[1])
    share = number / sum(counts.values())
    return f" (argmax at {label} for {100 * share:.0f}% of them)"


def _layer_rows(traces, ids: Sequence[int], limits: AnomalyThresholds, similarity) -> list:
    if len(ids) < 3:
        return []
    if list(ids) != list(range(ids[0], ids[0] + len(ids))):
        return []  # neighbours are undefined when recorded layers have gaps
    if similarity is None:
        similarity = layer_similarity(traces, "jsd")
    elif set(similarity["metric"]) != {"jsd"}:
        raise ValueError("detect_anomalies(similarity=...) needs layer_similarity(trace, metric='jsd').")
    table = similarity.pivot(index="layer_a", columns="layer_b", values="value").loc[list(ids), list(ids)]
    matrix = table.to_numpy(np.float64)
    adjacent = np.array([matrix[i, i + 1] for i in range(len(ids) - 1)])
    median = float(np.median(adjacent))
    scale = max(1.4826 * float(np.median(np.abs(adjacent - median))), 0.1 * median, 1e-12)
    rows = []
    for position in range(1, len(ids) - 1):
        before, after = matrix[position, position - 1], matrix[position, position + 1]
        distance = float(min(before, after))
        score = (distance - median) / scale
        rows.append((ids[position], ALL_HEADS, "layer inconsistency", score, limits.layer_z, score >= limits.layer_z,
                     f"JS divergence to layer {ids[position - 1]} is {before:.3f} and to layer "
                     f"{ids[position + 1]} is {after:.3f}; adjacent layers typically differ by "
                     f"{median:.3f} (robust z = {score:.1f})"))
    return rows
