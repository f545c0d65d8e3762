"""Heads and layers whose attention looks wrong, with the reason.

Four kinds, each a score per head (or per layer) against a threshold:

- over-dispersed (per head): mean normalized entropy (head_scores's
  normalized_entropy: entropy / ln(visible keys), counted inside the layer's sliding
  window if it has one; 1 = uniform) >= ``dispersed``.
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
  |argmax(i + 1) - argmax(i)| / span, where span is the tokens in the sequence, or the
  layer's sliding window W when that is smaller (the farthest an argmax can range, so a
  windowed layer at long context is judged on the same scale), and a pair counts only when
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
``AnomalyThresholds`` and benchmarks/RESULTS.md): each sits beyond every head of the
healthy model and below every head of the same model with broken query/key weights.

Length. The thresholds were first measured at 128 tokens; on a short text a healthy head
looks like a broken one, so each head kind has a minimum length below which it gives no
verdict (verdict "too short", score NaN, never a flag). Length is a sequence's *span*:
its tokens, or the layer's sliding window W when smaller (the most keys a query sees).

- over-dispersed needs >= 3 tokens (``min_tokens_dispersed``). Normalized entropy divides
  by ln(visible keys), so uniform attention scores exactly 1 at every length (Clark et
  al. 2019's uniform baseline ln n, made length-free); healthy MiniLM stays <= 0.95 from
  3 to 128 tokens and the broken std-0.02 model >= 0.99 at every length. With two keys
  any mild split (0.6 / 0.4: 0.97) reads as near-uniform, so two tokens are too short.
- over-concentrated needs >= 12 tokens (``min_tokens_concentrated``), counted per
  sequence: shorter sequences do not enter the score. With n keys the two largest
  weights hold at least 2 / n by chance, and healthy MiniLM puts nearly everything on
  [CLS] in short texts (Clark et al.'s no-op attention): at 4-11 tokens some healthy head
  has 100% of its queries at top-2 mass >= 0.98 on [CLS], at 12-24 tokens at most 25%,
  at 100+ tokens at most 10% (benchmarks/anomaly_rates.py). The top-2 mass is 0.98 (it
  was 0.9: at 12-24 tokens healthy sink heads reach 0.9-0.95 on [CLS] for most queries,
  a dead head puts everything on one key).
- jumping needs >= 16 tokens (``min_tokens_jump``), per sequence as above. The null: a
  head whose argmax is uniformly random over n keys scores (exactly, benchmarks/
  anomaly_rates.py's null_jump) 0.08 at n = 6, 0.16 at 8, 0.25 at 12, 0.28 at 16 and
  0.33 at 128: below 16 tokens most random argmaxes are "local" or on [CLS]/[SEP], and a
  random head would not clear the 0.15 threshold reliably; healthy heads reach 0.18 at
  10 tokens (few pairs, noisy) and at most 0.13 from 16 tokens on.
- layer inconsistency has no minimum: its z-score compares the layers of the same text.

For a corpus, the concentrated and jump scores average over the sequences long enough,
and the verdict is "too short" only when none is.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from attnjax.analysis._common import (
    ALL_HEADS, TraceOrTraces, as_traces, has_attention, layer_ids, resolve_thresholds, trace_windows,
)
from attnjax.analysis._terms import (
    CONCENTRATED_MASS, DECISIVE, LOCAL_WINDOW, MIN_TOKENS_CONCENTRATED, MIN_TOKENS_JUMP,
)
from attnjax.analysis.scores import anomaly_parameters, head_scores
from attnjax.analysis.similarity import layer_similarity

KINDS = ("over-dispersed", "over-concentrated", "jumping", "layer inconsistency")
# The verdict column: a flag, no flag, or no verdict because the text is too short.
VERDICTS = ("flagged", "not flagged", "too short")


@dataclasses.dataclass(frozen=True)
class AnomalyThresholds:
    """Thresholds of detect_anomalies, chosen from measurements (benchmarks/RESULTS.md).

    Measured on all-MiniLM-L6-v2 (72 heads; the 64 benchmark texts at 128 tokens, and an
    encyclopedic paragraph), healthy: mean normalized entropy 0.002-0.966 over heads
    (the broadest are layer 0's); share of concentrated queries on a fixed key at most
    0.53; jump score at most 0.034; layer z-scores at most 0.0. The same model with its
    query/key weights replaced by noise: std 0.02 (near-uniform attention) gives
    normalized entropy >= 0.997 for every head; std 0.3-1.0 (sharp attention on random
    keys) gives jump scores 0.20-0.37 for every head. Each default sits between the two.
    The minimum lengths (tokens, or the window W if smaller) and the top-2 mass 0.98 come
    from the same model on short texts: the module docstring says why each is where it is.
    """

    dispersed: float = 0.98              # mean normalized entropy, at least
    concentrated_mass: float = CONCENTRATED_MASS  # 0.98: top-2 mass of one query, at least ...
    concentrated_fraction: float = 0.8   # ... for at least this share of queries ("most")
    jump: float = 0.15                   # mean unexplained |argmax step| / tokens, at least
    decisive: float = DECISIVE           # 0.5: a query's argmax counts for jumping when its weight >= this
    local_window: int = LOCAL_WINDOW     # 2: |argmax - query| <= this counts as local
    layer_z: float = 3.5                 # robust z of a layer's divergence from its neighbours
    min_tokens_dispersed: int = 3        # shorter: no over-dispersed verdict ("too short")
    min_tokens_concentrated: int = MIN_TOKENS_CONCENTRATED  # 12: ... no over-concentrated verdict
    min_tokens_jump: int = MIN_TOKENS_JUMP  # 16: ... no jumping verdict


def detect_anomalies(
    trace: TraceOrTraces,
    thresholds=None,
    *,
    scores: Optional[pd.DataFrame] = None,
    similarity: Optional[pd.DataFrame] = None,
    flagged_only: bool = True,
) -> pd.DataFrame:
    """Flag over-dispersed, over-concentrated and jumping heads, and inconsistent layers.

    trace: a Trace or a list of Traces (a corpus); full maps or streaming stats.
    thresholds: AnomalyThresholds or a dict overriding some of its fields.
    scores: head_scores(trace) to reuse (it carries the per-head anomaly scores); computed
      if None, or if it was computed with other concentrated_mass / decisive / local_window
      / min_tokens_* parameters.
    similarity: layer_similarity(trace, "jsd") to reuse; computed if None.
    flagged_only: return only flagged rows (default) or every evaluated row, including
      the "too short" ones.

    Columns: layer (int), head (int; -1 for a whole-layer row), kind (str, one of
    KINDS), score (float; NaN when too short), threshold (float), flagged (bool), verdict
    (str, one of VERDICTS: "too short" when the text is under the kind's minimum length,
    which is never a flag), detail (str: why, in words). ``frame.attrs["too_short"]``
    maps each kind left without a verdict to the reason, in words (also with
    flagged_only=True). Definitions in the module docstring.
    """
    limits = resolve_thresholds(AnomalyThresholds, thresholds, "anomaly")
    traces = as_traces(trace)
    parameters = anomaly_parameters(limits.concentrated_mass, limits.decisive, limits.local_window,
                                    limits.min_tokens_concentrated, limits.min_tokens_jump)
    if scores is None or scores.attrs.get("anomaly_parameters") != parameters:
        scores = head_scores(traces, **parameters)
    ids = layer_ids(traces[0])
    if sorted(set(scores["layer"])) != sorted(ids):
        raise ValueError(f"detect_anomalies(scores=...) covers layers {sorted(set(scores['layer']))}, "
                         f"but the Trace holds layers {list(ids)}; pass head_scores of this Trace.")
    top_name = "top-2 weights" if has_attention(traces[0]) else "max weight (stats: top-1 only)"
    longest = longest_span(traces)  # {layer: tokens}
    minimum = {"over-dispersed": limits.min_tokens_dispersed, "over-concentrated": limits.min_tokens_concentrated,
               "jumping": limits.min_tokens_jump}
    too_short = {}

    def row(layer, head, kind, value, threshold, detail):
        if longest[layer] < minimum[kind] or not np.isfinite(value):
            reason = (f"too short for a verdict: the longest text has {longest[layer]} tokens (in this layer's "
                      f"view), and a {kind} verdict needs at least {minimum[kind]}")
            too_short.setdefault(kind, reason)
            return (layer, head, kind, np.nan, threshold, False, "too short", reason)
        flagged = bool(value >= threshold)
        return (layer, head, kind, value, threshold, flagged, "flagged" if flagged else "not flagged", detail)

    rows = []
    for item in scores.itertuples(index=False):
        layer, head = int(item.layer), int(item.head)
        value = float(item.normalized_entropy)
        rows.append(row(layer, head, "over-dispersed", value, limits.dispersed,
                        f"mean normalized entropy {value:.3f} >= {limits.dispersed:g}: attention is close "
                        "to uniform over the visible keys"))
        value = float(item.concentrated)
        target = f", mostly on {item.concentrated_on}" if item.concentrated_on else ""
        rows.append(row(layer, head, "over-concentrated", value, limits.concentrated_fraction,
                        f"{100 * value:.0f}% of queries put >= {limits.concentrated_mass:g} of their attention "
                        f"({top_name}) on a sink or fixed key{target}: a dead or sink head"))
        value = float(item.jump)
        rows.append(row(layer, head, "jumping", value, limits.jump,
                        f"the argmax moves {value:.3f} of the sequence per query step on average, in "
                        "steps neither local (previous/self/next token), to a sink, nor "
                        "content-following (duplicate/induction)"))
    rows.extend(_layer_rows(traces, ids, limits, similarity))
    frame = pd.DataFrame(rows, columns=["layer", "head", "kind", "score", "threshold", "flagged", "verdict", "detail"])
    frame = frame.astype({"layer": np.int64, "head": np.int64, "score": np.float64,
                          "threshold": np.float64, "flagged": bool})
    if flagged_only:
        frame = frame[frame["flagged"]].reset_index(drop=True)
    frame.attrs["too_short"] = too_short
    return frame


def longest_span(traces) -> dict:
    """{model layer: the longest span of any sequence}: its tokens, or the layer's window
    W when smaller (the most keys one query can see there)."""
    tokens = max(int(np.asarray(item.mask, bool).sum(-1).max()) for item in traces)
    return {layer: tokens if window is None else min(tokens, int(window))
            for layer, window in zip(layer_ids(traces[0]), trace_windows(traces[0]))}


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
        flagged = bool(score >= limits.layer_z)
        rows.append((ids[position], ALL_HEADS, "layer inconsistency", score, limits.layer_z, flagged,
                     "flagged" if flagged else "not flagged",
                     f"JS divergence to layer {ids[position - 1]} is {before:.3f} and to layer "
                     f"{ids[position + 1]} is {after:.3f}; adjacent layers typically differ by "
                     f"{median:.3f} (robust z = {score:.1f})"))
    return rows
