"""One head's attention for one query, stage by stage (as Transformer Explainer shows it).

Stages, each panel titled with its number: 1 q and each k (heatmaps over head_dim);
2 q.k; 3 scaled (times the layer's scale; Gemma 2 adds 3b, the soft-cap); 4 masked
(invisible keys become -inf); 5 softmax; 6 the weighted sum of v. The numbers are
recomputed from the recorded q, k, v (Capture(qkv=True)) by
attnjax.viz.inside_frames.attention_step_frames and equal Trace.scores / attention.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from attnjax.trace import Trace
from attnjax.viz.common import inline, label_expr, label_param, title, visible_text
from attnjax.viz.inside_frames import attention_step_frames

CELL = 7            # px per head_dim cell
ROW = 16            # px per key row
BAR_WIDTH = 110     # px per bar panel
DIVERGING = alt.Scale(scheme="redblue", domainMid=0, reverse=True)


def _vector_map(frame: pd.DataFrame, heading: str, field: str, head_dim: int, legend_title: str) -> alt.Chart:
    chart = (
        alt.Chart(title=alt.TitleParams(heading, anchor="start", fontSize=12),
                  width=head_dim * CELL, height=alt.Step(ROW))
        .mark_rect()
        .encode(
            x=alt.X("dim:O", title="dimension", axis=alt.Axis(labelFontSize=8, labelAngle=0, values=list(
                range(0, head_dim, 8)))),
            y=alt.Y("row:N", title=None, sort=None, axis=alt.Axis(labelFontSize=10, labelLimit=160)),
            color=alt.Color(f"{field}:Q", scale=DIVERGING, title=legend_title),
            tooltip=[alt.Tooltip("row:N", title="vector"), alt.Tooltip("dim:O"),
                     alt.Tooltip(f"{field}:Q", format=".4f")],
        )
    )
    chart.data = inline(frame, ["row", "dim", field])  # attached last: Altair deep-copies data on every call
    return chart


def _bars(keys: pd.DataFrame, field: str, heading: str, *, show_y: bool, fmt: str = ".3f") -> alt.LayerChart:
    base = alt.Chart()
    # Keys in position order; labels from the step_labels parameter (data, never expression text).
    y = alt.Y("key:O", title=None, axis=alt.Axis(labelExpr=label_expr("step_labels"), labelFontSize=10,
                                                 labelLimit=160) if show_y else None)
    bars = base.mark_bar(color="#4c78a8").encode(
        y=y, x=alt.X(f"{field}:Q", title=None, axis=alt.Axis(labelFontSize=8, tickCount=3)),
        tooltip=[alt.Tooltip("token:N", title="key"), alt.Tooltip("key:Q", title="key position"),
                 alt.Tooltip(f"{field}:Q", format=".5f")])
    numbers = base.transform_calculate(
        shown_text=f"isValid(datum.{field}) ? format(datum.{field}, '{fmt}') : '\u2212\u221e (masked)'"
    ).mark_text(align="left", dx=4, fontSize=9, color="#222").encode(
        y=y, x=alt.value(BAR_WIDTH), text="shown_text:N")
    panel = alt.layer(bars, numbers).properties(
        title=alt.TitleParams(heading, anchor="start", fontSize=12), width=BAR_WIDTH, height=alt.Step(ROW))
    panel.data = inline(keys, ["key", "token", field])  # attached last: Altair deep-copies data on every call
    return panel


def attention_steps(trace: Trace, layer: int, head: int, query: int, *, sequence: int = 0) -> alt.VConcatChart:
    """The computation of query position ``query`` in ``layer`` / ``head``, stage by stage.

    Needs Capture(qkv=True). Long inputs show the STEPS_MAX_KEYS keys with the highest
    weights (the softmax is over every key; the subtitle says how many are drawn).
    """
    steps = attention_step_frames(trace, layer, head, query, sequence=sequence)
    info = steps["info"]
    keys = steps["keys"]
    keys = keys[keys["shown"]].assign(row=lambda f: [f"{k} {lab}" for k, lab in zip(f["key"], f["label"])])
    head_dim = info["head_dim"]
    scale_text = f"{info['scale']:.4g}"
    stage_1 = _vector_map(steps["vectors"], f"1 \u00b7 q (query {info['query']}) and each k ({head_dim} dims)",
                          "value", head_dim, "q, k")
    panels = [
        _bars(keys, "dot", "2 \u00b7 q\u00b7k", show_y=True),
        _bars(keys, "scaled", f"3 \u00b7 scaled (\u00d7 {scale_text})", show_y=False),
    ]
    if info["softcap"] is not None:
        cap = f"{info['softcap']:g}"
        panels.append(_bars(keys, "capped", f"3b \u00b7 soft-capped {cap}\u00b7tanh(s/{cap})", show_y=False))
    panels += [
        _bars(keys, "masked", "4 \u00b7 masked", show_y=False),
        _bars(keys, "weight", "5 \u00b7 softmax", show_y=False),
    ]
    output = steps["output"].assign(row="= output (sum)", weighted=steps["output"]["value"])
    stage_6 = _vector_map(pd.concat([steps["values"][["row", "dim", "weighted"]], output[["row", "dim", "weighted"]]],
                                    ignore_index=True),
                          "6 \u00b7 weighted sum of v: weight \u00d7 v of each key, and their sum", "weighted", head_dim,
                          "weight \u00d7 v")
    group = ""
    if info["kv_heads"] != info["heads"]:
        group = f" (reads kv head {info['kv_head']} of {info['kv_heads']})"
    subtitle = [
        f"query {info['query']} \u201c{visible_text(info['query_token'])}\u201d \u00b7 {info['keys']} keys"
        + (f", the {info['shown']} with the highest weights drawn" if info["shown"] < info["keys"] else ""),
        "recomputed from the recorded q, k, v (Capture(qkv=True))",
    ]
    return (
        alt.vconcat(stage_1, alt.hconcat(*panels, spacing=52), stage_6, spacing=18)
        .add_params(label_param("step_labels", dict(zip(keys["key"], keys["row"]))))
        .resolve_scale(color="independent")
        .properties(title=title(f"Attention step by step, layer {info['layer']} head {info['head']}{group}", subtitle))
    )
