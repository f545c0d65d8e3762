"""Attention maps: one head as a heatmap, and every head of a model at once.

Both take the long frame of :func:`attnjax.viz.attention_frame` (columns layer,
head, query, key, weight, query_token, key_token).

The overview keeps a whole model small by sending each weight once, as one
character of a log-spaced 90-level code (attnjax.viz.codes: within 5.4 % of
the true weight), one code string per head, plus one small palette PNG per head
for the grid. The browser expands only the head on show into cells, with Vega
expressions (``sequence``, ``substring``, ``indexof``). A BERT-base-sized model
(144 heads) at 128 tokens is 2.4 MB of codes; see docs/viz.md for the budget.
"""

from __future__ import annotations

from typing import Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz import codes
from attnjax.viz.common import (
    colour_calculation,
    colour_field,
    colour_scale,
    inline,
    label_expr,
    label_param,
    pooled_note,
    renderer_hint,
    require_columns,
    score_columns,
    title,
)
from attnjax.viz.frames import HEATMAP_MAX_TOKENS, OVERVIEW_MAX_WEIGHTS, maps_from_frame, truncate
from attnjax.viz.images import thumbnail

FRAME_COLUMNS = ("layer", "head", "query", "key", "weight")
MADE_BY = "attnjax.viz.attention_frame(trace)"


def _axis_size(count: int, target: int = 480, smallest: int = 3, largest: int = 28) -> int:
    """Pixels per token so a map is about ``target`` px wide."""
    return int(max(smallest, min(largest, target // max(count, 1))))


def attention_heatmap(
    frame: pd.DataFrame,
    *,
    layer: Optional[int] = None,
    head: Optional[int] = None,
    scheme: str = "viridis",
    scale: str = "linear",
    size: int = 480,
) -> alt.Chart:
    """One head's attention: queries down, keys across, weight as colour.

    frame: an attention frame (all of it, or just one head). ``layer``/``head``
    pick the head (default: the first in the frame). ``scheme``: viridis, plasma,
    magma, inferno or cividis. ``scale``: linear (the colour domain spans the
    weights present), log (down to 1e-4) or quantile (9 colours by rank, so a
    [SEP] or [CLS] column cannot wash out the rest). Padding is not in the frame,
    so it is not drawn. Above HEATMAP_MAX_TOKENS tokens pass a pooled frame.
    """
    require_columns(frame, FRAME_COLUMNS, "The attention frame", MADE_BY)
    layer = int(frame["layer"].iloc[0]) if layer is None else int(layer)
    at_layer = frame[frame["layer"] == layer]
    head = int(at_layer["head"].iloc[0]) if head is None and not at_layer.empty else head
    one = at_layer[at_layer["head"] == head]
    if one.empty:
        raise ValueError(f"The frame has no rows for layer {layer}, head {head}.")
    maps, _, _, queries, keys, q_tokens, k_tokens = maps_from_frame(one)
    if max(len(queries), len(keys)) > HEATMAP_MAX_TOKENS:
        raise ValueError(
            f"{len(queries)} x {len(keys)} tokens is over the heatmap's {HEATMAP_MAX_TOKENS}-token budget; "
            "capture Capture(stats=True, pool=64) and pass the pooled attention_frame."
        )
    weights = maps[0, 0]                                                       # (Q, K)
    q_index, k_index = np.indices(weights.shape).reshape(2, -1)
    cells = pd.DataFrame({"query": queries[q_index], "key": keys[k_index], "weight": weights.reshape(-1)})
    tokens = pd.DataFrame({"position": np.concatenate([queries, keys]),
                           "token": list(q_tokens) + list(k_tokens)}).drop_duplicates("position")
    q_labels = label_param("query_labels", {int(p): truncate(t) for p, t in zip(queries, q_tokens)})
    k_labels = label_param("key_labels", {int(p): truncate(t) for p, t in zip(keys, k_tokens)})
    step = _axis_size(max(len(queries), len(keys)), size)
    lookup = alt.LookupData(data=inline(tokens), key="position", fields=["token"])
    chart = (
        alt.Chart(inline(cells), width=alt.Step(step), height=alt.Step(step),
                  title=title(f"Attention, layer {layer} head {head}",
                              [pooled_note(frame), "rows: query (from) · columns: key (to)"]))
        .transform_lookup(lookup="query", from_=lookup, as_=["query_token"])
        .transform_lookup(lookup="key", from_=lookup, as_=["key_token"])
        .transform_calculate(**colour_calculation(scale))
        .mark_rect()
        .encode(
            x=alt.X("key:O", title="key", axis=alt.Axis(labelExpr=label_expr("key_labels"), labelAngle=-60,
                                                        labelFontSize=9, labelOverlap="greedy")),
            y=alt.Y("query:O", title="query", axis=alt.Axis(labelExpr=label_expr("query_labels"),
                                                            labelFontSize=9, labelOverlap="greedy")),
            color=alt.Color(f"{colour_field(scale)}:Q", title="weight", scale=colour_scale(scheme, scale)),
            tooltip=[
                alt.Tooltip("query_token:N", title="query"),
                alt.Tooltip("key_token:N", title="key"),
                alt.Tooltip("weight:Q", title="weight", format=".4f"),
                alt.Tooltip("query:O", title="query position"),
                alt.Tooltip("key:O", title="key position"),
            ],
        )
        .add_params(q_labels, k_labels)
        .properties(usermeta=renderer_hint(len(cells)))
    )
    return chart


def model_overview(
    frame: pd.DataFrame,
    *,
    scores: Optional[pd.DataFrame] = None,
    scheme: str = "viridis",
    scale: str = "linear",
    cell: int = 44,
    size: int = 440,
    start: Optional[Sequence[int]] = None,
) -> alt.HConcatChart:
    """Every layer x head as a grid of thumbnails; the selected head drawn large beside it.

    Click a thumbnail, or move the layer/head sliders (the ``head_select``
    parameter), to open that head. The large view is decoded in the browser from
    the one-character codes (its tooltip weights are within 5.4 %). ``scores``
    (optional, one row per layer/head, e.g. head_scores or classify_heads output)
    adds its columns to the grid's tooltip. ``start``: the (layer, head) shown first.
    """
    require_columns(frame, FRAME_COLUMNS, "The attention frame", MADE_BY)
    maps, layer_ids, head_ids, queries, keys, q_tokens, k_tokens = maps_from_frame(frame)
    n_layers, n_heads, n_q, n_k = maps.shape
    if maps.size > OVERVIEW_MAX_WEIGHTS:
        raise ValueError(
            f"{n_layers} layers x {n_heads} heads x {n_q} x {n_k} tokens = {maps.size:,} weights is over the "
            f"overview's budget of {OVERVIEW_MAX_WEIGHTS:,} (a 12 x 12-head model at 128 tokens); "
            "pass a pooled attention_frame (Capture(stats=True, pool=P)) or fewer layers."
        )
    grid_rows, code_rows = [], []
    for li, layer in enumerate(layer_ids):
        for hi, head in enumerate(head_ids):
            head_map = maps[li, hi]                                            # (Q, K)
            grid_rows.append({"layer": int(layer), "head": int(head),
                              "image": thumbnail(head_map, scheme=scheme, scale=scale, size=cell)})
            code_rows.append({"layer": int(layer), "head": int(head), "n_q": n_q, "n_k": n_k,
                              "codes": codes.encode(head_map)})
    grid = pd.DataFrame(grid_rows)
    tooltip = [alt.Tooltip("layer:O"), alt.Tooltip("head:O")]
    if scores is not None:
        require_columns(scores, ("layer", "head"), "scores", "attnjax.analysis.head_scores(trace)")
        extra = scores.drop_duplicates(["layer", "head"])
        grid = grid.merge(extra, on=["layer", "head"], how="left", suffixes=("", "_score"))
        if "category" in grid.columns:
            tooltip.append(alt.Tooltip("category:N"))
        tooltip += [alt.Tooltip(f"{c}:Q", format=".3f") for c in score_columns(extra) if c in grid.columns]

    first_layer, first_head = (int(layer_ids[0]), int(head_ids[0])) if start is None else map(int, start)
    if first_layer not in set(map(int, layer_ids)) or first_head not in set(map(int, head_ids)):
        raise ValueError(
            f"model_overview(start={tuple(start)}): the frame holds layers "
            f"{[int(i) for i in layer_ids]} and heads {[int(i) for i in head_ids]}; start from one of them."
        )
    select = alt.selection_point(
        name="head_select", fields=["layer", "head"], on="click", clear=False, toggle=False,
        value=[{"layer": first_layer, "head": first_head}],
        bind={"layer": _binding(layer_ids, "layer "), "head": _binding(head_ids, "head ")},
    )
    base = alt.Chart(inline(grid), width=n_heads * cell, height=n_layers * cell)
    position = dict(x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
                    y=alt.Y("layer:O", title="layer"))
    images = base.mark_image(width=cell - 2, height=cell - 2, aspect=False).encode(url="image:N", **position)
    frames = base.mark_rect(fillOpacity=0, strokeWidth=3, cursor="pointer").encode(
        stroke=alt.condition(select, alt.value("#e4002b"), alt.value("transparent")),
        tooltip=tooltip, **position,
    ).add_params(select)
    grid_chart = alt.layer(images, frames).properties(
        title=title("All heads", "click a head (or use the sliders) to open it"))

    step = _axis_size(max(n_q, n_k), size)
    q_labels = label_param("overview_query_labels", [truncate(t) for t in q_tokens])
    k_labels = label_param("overview_key_labels", [truncate(t) for t in k_tokens])
    full_q = [{"index": i, "token": str(t)} for i, t in enumerate(q_tokens)]
    full_k = [{"index": i, "token": str(t)} for i, t in enumerate(k_tokens)]
    decode = codes.vega_decode("substring(datum.codes, datum.cell, datum.cell + 1)")
    detail = (
        alt.Chart(inline(code_rows), width=alt.Step(step), height=alt.Step(step),
                  title=alt.TitleParams(
                      text=alt.ExprRef(expr="'Layer ' + head_select_layer + ', head ' + head_select_head"),
                      subtitle=["rows: query (from) · columns: key (to) · weights to ±5%"], anchor="start"))
        .transform_filter(select)
        .transform_calculate(cell="sequence(0, datum.n_q * datum.n_k)")
        .transform_flatten(["cell"])
        .transform_calculate(query="floor(datum.cell / datum.n_k)", key="datum.cell % datum.n_k", weight=decode)
        .transform_calculate(**colour_calculation(scale))
        .transform_lookup(lookup="query", from_=alt.LookupData(inline(full_q), "index", ["token"]),
                          as_=["query_token"])
        .transform_lookup(lookup="key", from_=alt.LookupData(inline(full_k), "index", ["token"]),
                          as_=["key_token"])
        .mark_rect()
        .encode(
            x=alt.X("key:O", title="key", axis=alt.Axis(labelExpr=label_expr("overview_key_labels"),
                                                        labelAngle=-60, labelFontSize=9, labelOverlap="greedy")),
            y=alt.Y("query:O", title="query", axis=alt.Axis(labelExpr=label_expr("overview_query_labels"),
                                                            labelFontSize=9, labelOverlap="greedy")),
            color=alt.Color(f"{colour_field(scale)}:Q", title="weight", scale=colour_scale(scheme, scale)),
            tooltip=[alt.Tooltip("query_token:N", title="query"), alt.Tooltip("key_token:N", title="key"),
                     alt.Tooltip("weight:Q", title="weight (±5%)", format=".3f"),
                     alt.Tooltip("query:O", title="query position"), alt.Tooltip("key:O", title="key position")],
        )
    )
    subtitle = [pooled_note(frame), f"{n_layers} layers x {n_heads} heads, {n_q} tokens; "
                f"thumbnails scaled per head ({scale}), colour scheme {scheme}"]
    return (
        alt.hconcat(grid_chart, detail, spacing=32)
        .add_params(q_labels, k_labels)
        .resolve_scale(color="independent")
        .properties(title=title("Model overview", subtitle), usermeta=renderer_hint(n_q * n_k + grid.shape[0]))
    )


def _binding(ids: np.ndarray, name: str):
    ids = [int(i) for i in ids]
    if ids == list(range(ids[0], ids[-1] + 1)):
        return alt.binding_range(min=ids[0], max=ids[-1], step=1, name=name)
    return alt.binding_select(options=ids, name=name)
