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
    NEAR_UNIFORM_TV,
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
    score_columns,
    visible_text,
    title,
    uniform_deviation,
    weight_range,
    with_params,
)
from attnjax.viz.frames import HEATMAP_MAX_TOKENS, OVERVIEW_MAX_WEIGHTS, maps_from_frame, truncate
from attnjax.viz.images import thumbnail

FRAME_COLUMNS = ("layer", "head", "query", "key", "weight")
MADE_BY = "attnjax.viz.attention_frame(trace)"


def _cell_size(count: int, target: int, largest: int = 28) -> float:
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
    axis = dict(tickMinStep=1, grid=False, labelFontSize=9, labelOverlap="greedy", labelBound=True)
    x = alt.X(f"{k_field}_x0:Q", title="key", scale=alt.Scale(domain=[-0.5, n_k - 0.5], nice=False, zero=False),
              axis=alt.Axis(labelExpr=label_expr(k_labels), labelAngle=-60, tickCount=n_k, **axis))
    y = alt.Y(f"{q_field}_y0:Q", title="query",
              scale=alt.Scale(domain=[-0.5, n_q - 0.5], nice=False, zero=False, reverse=True),
              axis=alt.Axis(labelExpr=label_expr(q_labels), tickCount=n_q, **axis))
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
    cell = _cell_size(max(len(queries), len(keys)), size)
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
    the one-character codes (its tooltip weights are within 5.4 %); its title gives
    the head's weight range, its linear colour domain is exactly that range (absolute:
    [0, 1]), and it zooms and pans like attention_heatmap. Near-uniform heads
    (viz.common.uniform_deviation <= NEAR_UNIFORM_TV) carry a "\u2248" on their thumbnail
    and in the large view's title. ``scores`` (optional, one row per layer/head, e.g.
    head_scores or classify_heads output) adds its columns to the grid's tooltip.
    ``start``: the (layer, head) shown first. A pooled frame is labelled as block means.
    """
    require_columns(frame, FRAME_COLUMNS, "The attention frame", MADE_BY)
    maps, layer_ids, head_ids, _, _, q_tokens, k_tokens = maps_from_frame(frame)
    return overview_from_maps(maps, layer_ids, head_ids, q_tokens, k_tokens, pooled=frame.attrs.get("pooled"),
                              scores=scores, scheme=scheme, scale=scale, cell=cell, size=size, start=start)


def overview_from_maps(maps: np.ndarray, layer_ids, head_ids, q_tokens, k_tokens, *, pooled=None,
                       scores: Optional[pd.DataFrame] = None, scheme: str = "viridis", scale: str = "linear",
                       cell: int = 44, size: int = 440, start: Optional[Sequence[int]] = None) -> alt.HConcatChart:
    """model_overview from (L, H, Q, K) maps and their ids and token labels, without the long
    frame (the explorer's path: a 1.2M-row frame costs ~0.1 s to build and read back).
    pooled: the frame's ``attrs["pooled"]`` ({"bins", "tokens"}) for block-mean maps."""
    check_scale(scale)
    maps = np.asarray(maps, dtype=np.float32)                                   # (L, H, Q, K)
    layer_ids, head_ids = np.asarray(layer_ids), np.asarray(head_ids)
    note_frame = pd.DataFrame()
    if pooled:
        note_frame.attrs["pooled"] = dict(pooled)
    n_layers, n_heads, n_q, n_k = maps.shape
    if maps.size > OVERVIEW_MAX_WEIGHTS:
        raise ValueError(
            f"{n_layers} layers x {n_heads} heads x {n_q} x {n_k} tokens = {maps.size:,} weights is over the "
            f"overview's budget of {OVERVIEW_MAX_WEIGHTS:,} (a 12 x 12-head model at 128 tokens); "
            "pass a pooled attention_frame (Capture(stats=True, pool=P)) or fewer layers."
        )
    pooled = bool(pooled)
    name = "block mean" if pooled else "weight"
    deviation = uniform_deviation(maps)                                        # (L, H)
    low, high = maps.min(axis=(2, 3)), maps.max(axis=(2, 3))                   # (L, H)
    grid_rows, code_rows, info = [], [], {}
    for li, layer in enumerate(layer_ids):
        for hi, head in enumerate(head_ids):
            head_map = maps[li, hi]                                            # (Q, K)
            uniform = bool(np.isfinite(deviation[li, hi]) and deviation[li, hi] <= NEAR_UNIFORM_TV)
            grid_rows.append({"layer": int(layer), "head": int(head),
                              "image": thumbnail(head_map, scheme=scheme, scale=scale, size=cell),
                              "uniform_deviation": float(deviation[li, hi]),
                              "marker": "\u2248" if uniform else ""})
            code_rows.append({"layer": int(layer), "head": int(head), "n_q": n_q, "n_k": n_k,
                              "codes": codes.encode(head_map)})
            domain = weight_range(head_map, scale) or [0.0, 1.0]
            info[f"{int(layer)},{int(head)}"] = {
                "low": float(f"{domain[0]:.4g}"), "high": float(f"{domain[1]:.4g}"),
                "text": f"{'range' if pooled else 'weights'} {low[li, hi]:.3g}\u2013{high[li, hi]:.3g}" + (
                    f" \u00b7 \u2248 near-uniform (within {deviation[li, hi]:.3f} of uniform)" if uniform else "")}
    grid = pd.DataFrame(grid_rows)
    tooltip = [alt.Tooltip("layer:O"), alt.Tooltip("head:O"),
               alt.Tooltip("uniform_deviation:Q", title="distance from uniform (TV)", format=".3f")]
    if scores is not None:
        require_columns(scores, ("layer", "head"), "scores", "attnjax.analysis.head_scores(trace)")
        extra = scores.drop_duplicates(["layer", "head"])
        grid = grid.merge(extra, on=["layer", "head"], how="left", suffixes=("", "_score"))
        if "category" in grid.columns:
            tooltip.append(alt.Tooltip("category:N"))
        tooltip += [alt.Tooltip(f"{c}:Q", format=".3f") for c in score_columns(extra)
                    if c in grid.columns and c != "uniform_deviation"]

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
    base = alt.Chart(inline_json(grid), width=n_heads * cell, height=n_layers * cell)
    position = dict(x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
                    y=alt.Y("layer:O", title="layer"))
    images = base.mark_image(width=cell - 2, height=cell - 2, aspect=False).encode(url="image:N", **position)
    markers = base.mark_text(fontSize=max(12, cell // 2), fontWeight="bold", color="white", stroke="#222",
                             strokeWidth=0.6).encode(text="marker:N", **position)
    frames = base.mark_rect(fillOpacity=0, strokeWidth=3, cursor="pointer").encode(
        stroke=alt.condition(select, alt.value("#e4002b"), alt.value("transparent")),
        tooltip=tooltip, **position,
    ).add_params(select)
    grid_chart = alt.layer(images, markers, frames).properties(
        title=title(f"All heads{' (block means)' if pooled else ''}",
                    ["click a head (or use the sliders) to open it",
                     f"\u2248 near-uniform: every row within {NEAR_UNIFORM_TV} (total variation) of uniform"]))

    detail_cell = _cell_size(max(n_q, n_k), size)
    q_labels = label_param("overview_query_labels", [truncate(t) for t in q_tokens])
    k_labels = label_param("overview_key_labels", [truncate(t) for t in k_tokens])
    heads_info = alt.param(name="overview_heads", value=info)
    full_q = [{"index": i, "token": str(t)} for i, t in enumerate(q_tokens)]
    full_k = [{"index": i, "token": str(t)} for i, t in enumerate(k_tokens)]
    decode = codes.vega_decode("substring(datum.codes, datum.cell, datum.cell + 1)")
    key = "overview_heads[head_select_layer + ',' + head_select_head]"
    encoding, calculations = zoom_axes(n_q, n_k, "overview_query_labels", "overview_key_labels",
                                       fields=("query", "key"))
    colour = colour_scale(scheme, scale)
    if scale in ("linear", "log"):  # the selected head's own [min, max], as in its title
        domain = [alt.ExprRef(expr=f"{key}.low"), alt.ExprRef(expr=f"{key}.high")]
        colour = alt.Scale(scheme=scheme, nice=False, domain=domain,
                           **({"type": "log"} if scale == "log" else {"zero": False}))
    detail = (
        alt.Chart(inline_json(code_rows), width=round(detail_cell * n_k), height=round(detail_cell * n_q),
                  title=alt.TitleParams(
                      text=alt.ExprRef(expr=f"'{'Block means, layer ' if pooled else 'Layer '}' + head_select_layer"
                                            f" + ', head ' + head_select_head + ' \u00b7 ' + {key}.text"),
                      subtitle=["rows: query (from) \u00b7 columns: key (to) \u00b7 weights to \u00b15%",
                                ZOOM_HINT], anchor="start"))
        .transform_filter(select)
        .transform_calculate(cell="sequence(0, datum.n_q * datum.n_k)")
        .transform_flatten(["cell"])
        .transform_calculate(query="floor(datum.cell / datum.n_k)", key="datum.cell % datum.n_k", weight=decode)
        .transform_calculate(**calculations, **colour_calculation(scale))
        .transform_lookup(lookup="query", from_=alt.LookupData(inline_json(full_q), "index", ["token"]),
                          as_=["query_token"])
        .transform_lookup(lookup="key", from_=alt.LookupData(inline_json(full_k), "index", ["token"]),
                          as_=["key_token"])
        .mark_rect()
        .encode(
            color=alt.Color(f"{colour_field(scale)}:Q", title=f"{name} (\u00b15%)", scale=colour),
            tooltip=[alt.Tooltip("query_token:N", title="query"), alt.Tooltip("key_token:N", title="key"),
                     alt.Tooltip("weight:Q", title=f"{name} (\u00b15%)", format=".3f"),
                     alt.Tooltip("query:O", title="query bin" if pooled else "query position"),
                     alt.Tooltip("key:O", title="key bin" if pooled else "key position")],
            **encoding,
        )
        .add_params(alt.selection_interval(name="overview_zoom", bind="scales"))
    )
    subtitle = [pooled_note(note_frame), f"{n_layers} layers x {n_heads} heads, {n_q} {'bins' if pooled else 'tokens'}; "
                + ("thumbnails on a fixed 0-1 scale" if scale == "absolute" else f"thumbnails scaled per head ({scale})")
                + f", colour scheme {scheme}"]
    chart = (alt.hconcat(grid_chart, detail, spacing=32).resolve_scale(color="independent")
             .properties(title=title("Model overview", subtitle), usermeta=renderer_hint(n_q * n_k + grid.shape[0])))
    return with_params(chart, q_labels, k_labels, heads_info)


def _binding(ids: np.ndarray, name: str):
    ids = [int(i) for i in ids]
    if ids == list(range(ids[0], ids[-1] + 1)):
        return alt.binding_range(min=ids[0], max=ids[-1], step=1, name=name)
    return alt.binding_select(options=ids, name=name)
