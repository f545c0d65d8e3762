"""BertViz's head view (Vig 2019) as an Altair chart: query tokens on the left, key
tokens on the right, one line per query -> key pair with its opacity set by the weight.

Interaction lives in the spec: ``head_view_layer`` / ``head_view_head`` parameters bound
to a slider and a dropdown ("all" overlays every head in its own colour), and two hover
selections, ``hover_query`` (left column) and ``hover_key`` (right column): pointing at
a token keeps only its lines.
"""

from __future__ import annotations

from typing import Optional

import altair as alt
import numpy as np
import pandas as pd

from attnjax.trace import Trace
from attnjax.viz.common import inline, renderer_hint
from attnjax.viz.inside_frames import head_view_frames

ALL = -1                 # head_view_head value that overlays every head
COLUMN_GAP = 260         # px between the two token columns
HEAD_COLOURS = "tableau20"       # over 10 heads; tableau10 up to 10
ONE_HEAD_COLOUR = "#1f5fa8"


def pack_lines(lines: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, head) with its lines as three space-separated strings (query
    rows, key rows, weights to 4 digits); the chart splits them in the browser. Thousands
    of lines cost a few strings instead of thousands of spec rows."""
    packed = []
    for (layer, head), group in lines.groupby(["layer", "head"], sort=True):
        packed.append({"layer": int(layer), "head": int(head),
                       "q": " ".join(map(str, group["q_row"])), "k": " ".join(map(str, group["k_row"])),
                       "w": " ".join(f"{w:.4g}" for w in group["weight"])})
    return pd.DataFrame(packed, columns=["layer", "head", "q", "k", "w"])


def _row_height(tokens: int) -> int:
    return int(max(8, min(18, 640 // max(tokens, 1))))


def head_view(trace: Trace, layer: Optional[int] = None, head: Optional[int] = None, *, sequence: int = 0,
              top_k: Optional[int] = None) -> alt.LayerChart:
    """The head view of one sequence of ``trace`` (needs Capture(attention=True)).

    layer: a model layer to show (only its lines are sent), or None for every recorded
    layer with a layer slider. head: the head shown first, or None to overlay all heads
    in head colours (the dropdown switches). top_k: draw only each query's top_k keys;
    by default every line up to HEAD_VIEW_MAX_TOKENS tokens and the top 5 above, and the
    subtitle says when lines were left out. Hover a token to keep only its lines.
    """
    layers = None if layer is None else [layer]
    lines, tokens, info = head_view_frames(trace, layers, sequence=sequence, top_k=top_k)
    heads = info["heads"]
    if head is not None and (isinstance(head, bool) or not isinstance(head, (int, np.integer))
                             or not 0 <= int(head) < heads):
        raise ValueError(f"head_view: head={head!r} is out of range; the model has {heads} heads (0..{heads - 1}), "
                         "or pass None to overlay them all.")
    row_of = {int(p): i for i, p in enumerate(tokens["position"])}
    base_tokens = tokens.assign(row=np.arange(len(tokens)), query=tokens["position"], key=tokens["position"])
    lines = lines.assign(q_row=lines["query"].map(row_of), k_row=lines["key"].map(row_of))
    n = len(tokens)
    height = n * _row_height(n)
    layer_ids = info["layers"]
    layer_bind = {"bind": _layer_binding(layer_ids)} if len(layer_ids) > 1 else {}
    layer_param = alt.param(name="head_view_layer", value=int(layer_ids[0]), **layer_bind)
    head_param = alt.param(name="head_view_head", value=ALL if head is None else int(head),
                           bind=alt.binding_select(options=[ALL] + list(range(heads)),
                                                   labels=["all"] + [str(h) for h in range(heads)], name="head "))
    # Each hover listens to its own column's marks only (a bare "pointerover" would fire on
    # every mark of the layer, lines included).
    hover_query = alt.selection_point(name="hover_query", fields=["query"], on="@head_view_queries_marks:pointerover",
                                      clear="@head_view_queries_marks:pointerout", empty=True)
    hover_key = alt.selection_point(name="hover_key", fields=["key"], on="@head_view_keys_marks:pointerover",
                                    clear="@head_view_keys_marks:pointerout", empty=True)
    x_scale = alt.Scale(domain=[0, 1], range=[0, COLUMN_GAP])
    y_scale = alt.Scale(domain=[-0.5, n - 0.5], range=[0, height])
    token_tooltip = [alt.Tooltip("token:N", title="token"), alt.Tooltip("position:Q", title="position")]
    positions = alt.LookupData(inline(base_tokens[["row", "position"]]), key="row", fields=["position"])
    rules = (
        alt.Chart(inline(pack_lines(lines)))
        .transform_filter("datum.layer == head_view_layer")
        .transform_filter(f"head_view_head == {ALL} || datum.head == head_view_head")
        .transform_calculate(q_row="split(datum.q, ' ')", k_row="split(datum.k, ' ')", weight="split(datum.w, ' ')")
        .transform_flatten(["q_row", "k_row", "weight"])
        .transform_calculate(q_row="toNumber(datum.q_row)", k_row="toNumber(datum.k_row)",
                             weight="toNumber(datum.weight)", left="0", right="1")
        .transform_lookup(lookup="q_row", from_=positions, as_=["query"])
        .transform_lookup(lookup="k_row", from_=positions, as_=["key"])
        .transform_filter(hover_query)
        .transform_filter(hover_key)
        .mark_rule(strokeWidth=2)
        .encode(
            x=alt.X("left:Q", scale=x_scale, axis=None), x2="right:Q",
            y=alt.Y("q_row:Q", scale=y_scale, axis=None), y2="k_row:Q",
            color=alt.condition(  # one head: one dark colour; every head: head colours
                "head_view_head >= 0", alt.value(ONE_HEAD_COLOUR),
                alt.Color("head:N", scale=alt.Scale(scheme="tableau10" if heads <= 10 else HEAD_COLOURS, domain=list(range(heads))),
                          legend=alt.Legend(title="head", offset=110, columns=2))),
            opacity=alt.Opacity("weight:Q", scale=alt.Scale(domain=[0, 1], range=[0, 1]), legend=None),
            tooltip=[alt.Tooltip("head:N"), alt.Tooltip("query:Q", title="query position"),
                     alt.Tooltip("key:Q", title="key position"), alt.Tooltip("weight:Q", format=".3f")],
        )
    )
    text = alt.Chart(inline(base_tokens)).mark_text(fontSize=min(12, _row_height(n) - 1), cursor="pointer")
    left = text.mark_text(align="right", dx=-6, fontSize=min(12, _row_height(n) - 1), cursor="pointer").encode(
        x=alt.value(0), y=alt.Y("row:Q", scale=y_scale, axis=None), text="label:N", tooltip=token_tooltip,
        color=alt.condition(hover_query, alt.value("#222"), alt.value("#aaa")),
    ).add_params(hover_query).properties(name="head_view_queries")
    right = text.mark_text(align="left", dx=6, fontSize=min(12, _row_height(n) - 1), cursor="pointer").encode(
        x=alt.value(COLUMN_GAP), y=alt.Y("row:Q", scale=y_scale, axis=None), text="label:N", tooltip=token_tooltip,
        color=alt.condition(hover_key, alt.value("#222"), alt.value("#aaa")),
    ).add_params(hover_key).properties(name="head_view_keys")
    note = None
    if info["top_k"] is not None:
        note = (f"Long input: {n} tokens, so only each query's top {info['top_k']} keys are drawn "
                "(pass top_k to change it).")
    heading = ("'Head view, layer ' + head_view_layer + (head_view_head < 0 ? ', all heads' : "
               "', head ' + head_view_head)")
    return (
        alt.layer(rules, left, right)
        .add_params(layer_param, head_param)
        .properties(
            width=COLUMN_GAP, height=height,
            title=alt.TitleParams(text=alt.ExprRef(expr=heading), anchor="start", subtitle=[s for s in (
                note, "left: queries (from) \u00b7 right: keys (to) \u00b7 line opacity = attention weight",
                "point at a token to keep only its lines") if s]),
            usermeta=renderer_hint(len(lines) + 2 * len(tokens)),
        )
        .configure_view(stroke=None)
    )


def _layer_binding(layer_ids):
    ids = [int(i) for i in layer_ids]
    if ids == list(range(ids[0], ids[-1] + 1)):
        return alt.binding_range(min=ids[0], max=ids[-1], step=1, name="layer ")
    return alt.binding_select(options=ids, name="layer ")
