"""The model overview: every head of a model at once, one opened large.

It keeps a whole model small by sending each weight once, as one character of a
log-spaced 90-level code (attnjax.viz.codes: within 5.4 % of the true weight),
one code string per head, plus one small palette PNG per head for the grid. The
browser expands only the head on show into cells, with Vega expressions
(``sequence``, ``substring``, ``indexof``). A BERT-base-sized model (144 heads) at
128 tokens is 2.4 MB of codes; see docs/viz.md for the budget.

The spec is written as a Vega-Lite dict (``overview_spec``) rather than composed
from Altair objects: composing a two-panel chart with selections copies every
subchart several times, which was most of the notebook explorer's redraw
(~150 ms of ~170 ms at 124 tokens). ``model_overview`` and ``overview_from_maps``
wrap the same dict as an Altair chart for users who compose it further.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz import codes
from attnjax.viz.attention import FRAME_COLUMNS, MADE_BY, cell_size, zoom_axes
from attnjax.viz.common import (
    NEAR_UNIFORM_TV,
    ZOOM_HINT,
    check_scale,
    check_scheme,
    colour_calculation,
    colour_field,
    colour_scale,
    json_rows,
    block_means_note,
    renderer_hint,
    require_columns,
    score_columns,
    uniform_deviation,
    visible_text,
    weight_range,
)
from attnjax.viz.frames import OVERVIEW_MAX_WEIGHTS, maps_from_frame, truncate
from attnjax.viz.images import thumbnails

GRID_VIEW = "overview_grid"      # the thumbnail grid's clickable layer (the head_select selection lives there)
DETAIL_VIEW = "overview_detail"  # the large view of the selected head (zooms and pans)
SELECTED = "overview_heads[head_select_layer + ',' + head_select_head]"  # the selected head's info, in Vega


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
    """model_overview from (L, H, Q, K) maps and their ids and token labels, without the
    long frame: ``overview_spec`` as an Altair chart."""
    spec = overview_spec(maps, layer_ids, head_ids, q_tokens, k_tokens, pooled=pooled, scores=scores,
                         scheme=scheme, scale=scale, cell=cell, size=size, start=start)
    with alt.utils.schemapi.debug_mode(False):  # the spec's validity is tested; to_dict validates it again
        return alt.HConcatChart.from_dict(spec, validate=False)


def overview_spec(maps: np.ndarray, layer_ids, head_ids, q_tokens, k_tokens, *, pooled=None,
                  scores: Optional[pd.DataFrame] = None, scheme: str = "viridis", scale: str = "linear",
                  cell: int = 44, size: int = 440, start: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The overview's Vega-Lite spec (a dict) from (L, H, Q, K) maps, their layer and head
    ids and the query / key token labels. pooled: the frame's ``attrs["pooled"]``
    ({"bins", "tokens"}) for block-mean maps. The notebook explorer displays this dict
    directly (a 1.2M-row frame and Altair's composition each cost ~0.1 s)."""
    check_scheme(scheme)
    check_scale(scale)
    maps = np.asarray(maps, dtype=np.float32)                                   # (L, H, Q, K)
    layer_ids = [int(i) for i in np.asarray(layer_ids)]
    head_ids = [int(i) for i in np.asarray(head_ids)]
    n_layers, n_heads, n_q, n_k = maps.shape
    if maps.size > OVERVIEW_MAX_WEIGHTS:
        raise ValueError(
            f"{n_layers} layers x {n_heads} heads x {n_q} x {n_k} tokens = {maps.size:,} weights is over the "
            f"overview's budget of {OVERVIEW_MAX_WEIGHTS:,} (a 12 x 12-head model at 128 tokens); "
            "pass a pooled attention_frame (Capture(stats=True, pool=P)) or fewer layers."
        )
    first_layer, first_head = (layer_ids[0], head_ids[0]) if start is None else map(int, start)
    if first_layer not in layer_ids or first_head not in head_ids:
        raise ValueError(
            f"model_overview(start={tuple(start)}): the frame holds layers {layer_ids} and heads {head_ids}; "
            "start from one of them."
        )
    grid, code_rows, info = _head_tables(maps, layer_ids, head_ids, bool(pooled), scheme, scale, cell)
    tooltip = [_field("layer", "ordinal"), _field("head", "ordinal"),
               _field("uniform_deviation", "quantitative", title="distance from uniform (TV)", format=".3f")]
    if scores is not None:
        require_columns(scores, ("layer", "head"), "scores", "attnjax.analysis.head_scores(trace)")
        extra = scores.drop_duplicates(["layer", "head"])
        grid = grid.merge(extra, on=["layer", "head"], how="left", suffixes=("", "_score"))
        if "category" in grid.columns:
            tooltip.append(_field("category", "nominal"))
        tooltip += [_field(c, "quantitative", format=".3f") for c in score_columns(extra)
                    if c in grid.columns and c != "uniform_deviation"]
    select = {
        "name": "head_select", "views": [GRID_VIEW],
        "select": {"type": "point", "fields": ["layer", "head"], "on": "click", "clear": False, "toggle": False},
        "value": [{"layer": first_layer, "head": first_head}],
        "bind": {"layer": _binding(layer_ids, "layer "), "head": _binding(head_ids, "head ")},
    }
    zoom = {"name": "overview_zoom", "views": [DETAIL_VIEW], "select": {"type": "interval"}, "bind": "scales"}
    labels = [_labels("overview_query_labels", q_tokens), _labels("overview_key_labels", k_tokens)]
    heads_info = {"name": "overview_heads", "value": info}
    thumbnail_note = ("thumbnails on a fixed 0-1 scale" if scale == "absolute"
                      else f"thumbnails scaled per head ({scale})")
    subtitle = [block_means_note(pooled),
                f"{n_layers} layers x {n_heads} heads, {n_q} {'bins' if pooled else 'tokens'}; {thumbnail_note}, "
                f"colour scheme {scheme}"]
    datasets: Dict[str, str] = {}
    return {
        "$schema": alt.SCHEMA_URL,
        "hconcat": [_grid_view(grid, tooltip, n_layers, n_heads, cell, bool(pooled), datasets),
                    _detail_view(code_rows, q_tokens, k_tokens, n_q, n_k, bool(pooled), scheme, scale, size,
                                 datasets)],
        "spacing": 32,
        "resolve": {"scale": {"color": "independent"}},
        "params": [select, zoom, *labels, heads_info],
        "title": _title("Model overview", subtitle),
        "usermeta": renderer_hint(n_q * n_k + len(grid)),
        "datasets": datasets,
    }


def opened_at(spec: Dict[str, Any], layer: int, head: int) -> Dict[str, Any]:
    """An ``overview_spec`` dict that opens (layer, head) first: a shallow copy with only the
    ``head_select`` start changed, its data shared (no rebuild when only the head changes)."""
    start = [{"layer": int(layer), "head": int(head)}]
    params = [{**param, "value": start} if param["name"] == "head_select" else param for param in spec["params"]]
    return {**spec, "params": params}


def _head_tables(maps: np.ndarray, layer_ids: List[int], head_ids: List[int], pooled: bool, scheme: str,
                 scale: str, cell: int):
    """Per head: the grid row (thumbnail, distance from uniform, marker), the code row
    (the map as one character per weight) and the large view's title and colour domain."""
    deviation = uniform_deviation(maps)                                        # (L, H)
    low, high = maps.min(axis=(2, 3)), maps.max(axis=(2, 3))                   # (L, H)
    n_layers, n_heads, n_q, n_k = maps.shape
    images = thumbnails(maps, scheme=scheme, scale=scale, size=cell)          # L * H, in (layer, head) order
    code_strings = codes.encode_each(maps.reshape(n_layers * n_heads, n_q, n_k))
    uniform = np.isfinite(deviation) & (deviation <= NEAR_UNIFORM_TV)          # (L, H)
    layer_column = np.repeat(layer_ids, n_heads)                               # (L * H,)
    head_column = np.tile(head_ids, n_layers)                                  # (L * H,)
    grid = pd.DataFrame({"layer": layer_column, "head": head_column, "image": images,
                         "uniform_deviation": deviation.reshape(-1),
                         "marker": np.where(uniform.reshape(-1), "\u2248", "")})
    code_rows = pd.DataFrame({"layer": layer_column, "head": head_column, "n_q": n_q, "n_k": n_k,
                              "codes": code_strings})
    info = {}
    for li, layer in enumerate(layer_ids):
        for hi, head in enumerate(head_ids):
            domain = weight_range(maps[li, hi], scale) or [0.0, 1.0]
            info[f"{layer},{head}"] = {
                "low": float(f"{domain[0]:.4g}"), "high": float(f"{domain[1]:.4g}"),
                "text": f"{'range' if pooled else 'weights'} {low[li, hi]:.3g}\u2013{high[li, hi]:.3g}" + (
                    f" \u00b7 \u2248 near-uniform (within {deviation[li, hi]:.3f} of uniform)"
                    if uniform[li, hi] else "")}
    return grid, code_rows, info


def _grid_view(grid: pd.DataFrame, tooltip: List[dict], n_layers: int, n_heads: int, cell: int,
               pooled: bool, datasets: Dict[str, str]) -> Dict[str, Any]:
    """The thumbnail grid: images, near-uniform markers, and a clickable frame per head."""
    position = {"x": {"field": "head", "type": "ordinal", "title": "head", "axis": {"labelAngle": 0}},
                "y": {"field": "layer", "type": "ordinal", "title": "layer"}}
    images = {"mark": {"type": "image", "width": cell - 2, "height": cell - 2, "aspect": False},
              "encoding": {"url": _field("image", "nominal"), **position}}
    markers = {"mark": {"type": "text", "fontSize": max(12, cell // 2), "fontWeight": "bold", "color": "white",
                        "stroke": "#222", "strokeWidth": 0.6},
               "encoding": {"text": _field("marker", "nominal"), **position}}
    frames = {"name": GRID_VIEW,
              "mark": {"type": "rect", "fillOpacity": 0, "strokeWidth": 3, "cursor": "pointer"},
              "encoding": {"stroke": {"condition": {"param": "head_select", "value": "#e4002b"},
                                      "value": "transparent"},
                           "tooltip": tooltip, **position}}
    return {
        "data": _dataset(grid, datasets), "width": n_heads * cell, "height": n_layers * cell,
        "layer": [images, markers, frames],
        "title": _title(f"All heads{' (block means)' if pooled else ''}",
                        ["click a head (or use the sliders) to open it",
                         f"\u2248 near-uniform: every row within {NEAR_UNIFORM_TV} (total variation) of uniform"]),
    }


def _detail_view(code_rows: pd.DataFrame, q_tokens, k_tokens, n_q: int, n_k: int, pooled: bool, scheme: str,
                 scale: str, size: int, datasets: Dict[str, str]) -> Dict[str, Any]:
    """The selected head drawn large: its code string expanded into cells in the browser."""
    name = "block mean" if pooled else "weight"
    encoding, calculations = zoom_axes(n_q, n_k, "overview_query_labels", "overview_key_labels",
                                       fields=("query", "key"))
    colour = _plain(colour_scale(scheme, scale))
    if scale in ("linear", "log"):  # the selected head's own [min, max], as in its title
        colour = {"scheme": scheme, "nice": False, "domain": [{"expr": f"{SELECTED}.low"}, {"expr": f"{SELECTED}.high"}],
                  **({"type": "log"} if scale == "log" else {"zero": False})}
    decode = codes.vega_decode("substring(datum.codes, datum.cell, datum.cell + 1)")
    # visible text before pandas: an Arrow string column (pandas with pyarrow) cannot hold a lone surrogate
    tokens = [_dataset(pd.DataFrame({"index": np.arange(len(t)), "token": [visible_text(x) for x in t]}), datasets)
              for t in (q_tokens, k_tokens)]
    cell = cell_size(max(n_q, n_k), size)
    transform = [
        {"filter": {"param": "head_select"}},
        {"calculate": "sequence(0, datum.n_q * datum.n_k)", "as": "cell"},
        {"flatten": ["cell"]},
        {"calculate": "floor(datum.cell / datum.n_k)", "as": "query"},
        {"calculate": "datum.cell % datum.n_k", "as": "key"},
        {"calculate": decode, "as": "weight"},
        *({"calculate": expression, "as": field}
          for field, expression in {**calculations, **colour_calculation(scale)}.items()),
        {"lookup": "query", "from": {"data": tokens[0], "key": "index", "fields": ["token"]}, "as": ["query_token"]},
        {"lookup": "key", "from": {"data": tokens[1], "key": "index", "fields": ["token"]}, "as": ["key_token"]},
    ]
    opened = "'Block means, layer '" if pooled else "'Layer '"
    return {
        "name": DETAIL_VIEW,
        "data": _dataset(code_rows, datasets), "width": round(cell * n_k), "height": round(cell * n_q),
        "title": {"text": {"expr": f"{opened} + head_select_layer + ', head ' + head_select_head + ' \u00b7 ' + "
                                   f"{SELECTED}.text"},
                  "subtitle": ["rows: query (from) \u00b7 columns: key (to) \u00b7 weights to \u00b15%", ZOOM_HINT],
                  "anchor": "start"},
        "transform": transform,
        "mark": {"type": "rect"},
        "encoding": {
            "color": {"field": colour_field(scale), "type": "quantitative", "title": f"{name} (\u00b15%)",
                      "scale": colour},
            "tooltip": [_field("query_token", "nominal", title="query"), _field("key_token", "nominal", title="key"),
                        _field("weight", "quantitative", title=f"{name} (\u00b15%)", format=".3f"),
                        _field("query", "ordinal", title="query bin" if pooled else "query position"),
                        _field("key", "ordinal", title="key bin" if pooled else "key position")],
            **{channel: _plain(value) if not isinstance(value, str) else {"field": value.split(":")[0]}
               for channel, value in encoding.items()},
        },
    }


def _field(field: str, kind: str, **extra) -> Dict[str, Any]:
    return {"field": field, "type": kind, **extra}


def _dataset(frame: pd.DataFrame, datasets: Dict[str, str]) -> Dict[str, Any]:
    """A data reference to ``frame``'s rows, stored once in ``datasets`` (the spec's top-level
    datasets) under a name made from their content, as Altair names consolidated data."""
    rows = json_rows(frame)
    name = "data-" + hashlib.sha256(rows.encode()).hexdigest()[:32]
    datasets[name] = rows
    return {"name": name, "format": {"type": "json"}}


def _labels(name: str, tokens) -> Dict[str, Any]:
    """A variable parameter of axis labels by position (as viz.common.label_param)."""
    return {"name": name, "value": {str(i): truncate(t) for i, t in enumerate(tokens)}}  # truncate: visible text


def _title(text: str, subtitle: Sequence[Optional[str]]) -> Dict[str, Any]:
    lines = [line for line in subtitle if line]
    return {"text": text, "anchor": "start", **({"subtitle": lines} if lines else {})}


def _plain(value) -> Any:
    """A small Altair schema object (a scale, an axis channel) as its dict."""
    return value.to_dict(validate=False) if hasattr(value, "to_dict") else value


def _binding(ids: List[int], name: str) -> Dict[str, Any]:
    if ids == list(range(ids[0], ids[-1] + 1)):
        return {"input": "range", "min": ids[0], "max": ids[-1], "step": 1, "name": name}
    return {"input": "select", "options": ids, "name": name}
