"""One head's attention as a heatmap, and the zoomable token axes it shares with the overview.

It takes the long frame of :func:`attnjax.viz.attention_frame` (columns layer,
head, query, key, weight, query_token, key_token); every head at once is
attnjax.viz.overview.model_overview.
"""

from __future__ import annotations

from typing import Optional

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz.common import (
    KEY_LABEL_BOUND,
    QUERY_LABEL_BOUND,
    ZOOM_HINT,
    check_scale,
    colour_calculation,
    colour_field,
    colour_legend,
    colour_scale,
    inline,
    inline_json,
    is_pooled,
    label_expr,
    label_param,
    near_uniform_note,
    pooled_note,
    renderer_hint,
    require_columns,
    visible_text,
    title,
    uniform_deviation,
    weight_range,
    with_params,
)
from attnjax.viz.frames import HEATMAP_MAX_TOKENS, maps_from_frame, truncate

FRAME_COLUMNS = ("layer", "head", "query", "key", "weight")
MADE_BY = "attnjax.viz.attention_frame(trace)"


def cell_size(count: int, target: int, largest: int = 28) -> float:
    """Pixels per token: the map is about ``target`` px wide, or smaller for a short input.
    Whole pixels from 2 px up, so that cell edges fall on pixels (no hairline seams)."""
    cell = min(largest, target / max(count, 1))
    return float(int(cell)) if cell >= 2 else float(cell)


def zoom_axes(n_q: int, n_k: int, q_labels: str, k_labels: str, fields=("query_index", "key_index")):
    """Continuous x/x2/y/y2 encodings over token indices, for a map that zooms and pans.

    Each token i spans [i - 0.5, i + 0.5], so integer ticks sit at cell centres. The
    axes ask for a tick at every token (``tickCount``); Vega thins labels that would
    overlap, and zooming in (an interval bound to the scales) brings every one back.
    The tooltip always has the token.
    """
    q_field, k_field = fields
    axis = dict(tickMinStep=1, grid=False, labelFontSize=9, labelOverlap="greedy")
    x = alt.X(f"{k_field}_x0:Q", title="key", scale=alt.Scale(domain=[-0.5, n_k - 0.5], nice=False, zero=False),
              axis=alt.Axis(labelExpr=label_expr(k_labels), labelAngle=-60, tickCount=n_k,
                            labelBound=KEY_LABEL_BOUND, **axis))
    y = alt.Y(f"{q_field}_y0:Q", title="query",
              scale=alt.Scale(domain=[-0.5, n_q - 0.5], nice=False, zero=False, reverse=True),
              axis=alt.Axis(labelExpr=label_expr(q_labels), tickCount=n_q, labelBound=QUERY_LABEL_BOUND, **axis))
    calculations = {f"{k_field}_x0": f"datum.{k_field} - 0.5", f"{k_field}_x1": f"datum.{k_field} + 0.5",
                    f"{q_field}_y0": f"datum.{q_field} - 0.5", f"{q_field}_y1": f"datum.{q_field} + 0.5"}
    return dict(x=x, x2=f"{k_field}_x1:Q", y=y, y2=f"{q_field}_y1:Q"), calculations


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
    magma, inferno or cividis. ``scale``: linear (the colour domain is exactly the
    weights' [min, max], printed in the legend), log (down to 1e-4), quantile (9
    colours by rank, so a [SEP] or [CLS] column cannot wash out the rest) or
    absolute (fixed [0, 1]: near-uniform weights then look alike). A near-uniform
    head (every query row within total-variation distance NEAR_UNIFORM_TV = 0.1 of
    uniform over its visible keys; viz.common.uniform_deviation) is marked in the
    subtitle, since a linear scale stretches its noise over the whole palette. A
    pooled frame is titled and labelled as block means. The map is ``size`` px wide
    at most (smaller for short inputs); it zooms and pans (scroll, drag; double-click
    resets), and labels thinned at full view come back when zoomed or on hover.
    Padding is not in the frame, so it is not drawn. Above HEATMAP_MAX_TOKENS tokens
    pass a pooled frame.
    """
    require_columns(frame, FRAME_COLUMNS, "The attention frame", MADE_BY)
    check_scale(scale)
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
    pooled = is_pooled(frame)
    weights = maps[0, 0]                                                       # (Q, K)
    q_index, k_index = np.indices(weights.shape).reshape(2, -1)
    cells = pd.DataFrame({"query": queries[q_index], "key": keys[k_index], "weight": weights.reshape(-1)})
    # visible text before pandas: an Arrow string column (pandas with pyarrow) cannot hold a lone surrogate
    q_table = pd.DataFrame({"position": queries, "token": [visible_text(t) for t in q_tokens],
                            "index": np.arange(len(queries))})
    k_table = pd.DataFrame({"position": keys, "token": [visible_text(t) for t in k_tokens],
                            "index": np.arange(len(keys))})
    q_labels = label_param("query_labels", [truncate(t) for t in q_tokens])
    k_labels = label_param("key_labels", [truncate(t) for t in k_tokens])
    cell = cell_size(max(len(queries), len(keys)), size)
    encoding, calculations = zoom_axes(len(queries), len(keys), "query_labels", "key_labels")
    name = "block mean" if pooled else "weight"
    subtitle = [pooled_note(frame), near_uniform_note(float(uniform_deviation(weights))),
                "rows: query (from) \u00b7 columns: key (to) \u00b7 " + ZOOM_HINT]
    chart = (
        alt.Chart(inline_json(cells), width=round(cell * len(keys)), height=round(cell * len(queries)),
                  title=title(f"Attention{' (block means)' if pooled else ''}, layer {layer} head {head}", subtitle))
        .transform_lookup(lookup="query", from_=alt.LookupData(inline(q_table), "position", ["token", "index"]),
                          as_=["query_token", "query_index"])
        .transform_lookup(lookup="key", from_=alt.LookupData(inline(k_table), "position", ["token", "index"]),
                          as_=["key_token", "key_index"])
        .transform_calculate(**calculations, **colour_calculation(scale))
        .mark_rect()
        .encode(
            color=alt.Color(f"{colour_field(scale)}:Q", scale=colour_scale(scheme, scale, weight_range(weights, scale)),
                            legend=colour_legend(scale, weights, pooled)),
            tooltip=[
                alt.Tooltip("query_token:N", title="query"),
                alt.Tooltip("key_token:N", title="key"),
                alt.Tooltip("weight:Q", title=name, format=".4f"),
                alt.Tooltip("query:O", title="query bin" if pooled else "query position"),
                alt.Tooltip("key:O", title="key bin" if pooled else "key position"),
            ],
            **encoding,
        )
        .properties(usermeta=renderer_hint(len(cells)))
    )
    return with_params(chart, q_labels, k_labels, alt.selection_interval(name="heatmap_zoom", bind="scales"))
