"""Layer-level views: similarity between layers, focus by layer, one token's flow."""

from __future__ import annotations

from typing import Optional

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz import codes
from attnjax.viz.common import (
    KEY_LABEL_BOUND,
    ZOOM_HINT,
    check_scale,
    check_scheme,
    colour_calculation,
    colour_field,
    colour_legend,
    colour_scale,
    inline,
    label_expr,
    label_param,
    require_columns,
    title,
    weight_range,
)
from attnjax.viz.frames import truncate

MEAN_HEAD = -1  # token_flow's head index of the mean over heads
FLOW_WIDTH = 900  # px: a token-flow panel, with its axis and legend, fits the report page (viz.html)
MAX_CELL = 24     # px: widest key column (short inputs)
ROW_HEIGHT = 26   # px: one layer's row


def _pair_columns(frame: pd.DataFrame):
    """(first, second, value) column names of a pairwise frame."""
    for first, second in (("layer_a", "layer_b"), ("layer_i", "layer_j"), ("layer_x", "layer_y"),
                          ("layer", "other_layer"), ("source_layer", "target_layer")):
        if first in frame.columns and second in frame.columns:
            break
    else:
        raise ValueError(f"The layer similarity frame needs two layer columns (layer_a, layer_b); "
                         f"it has {list(frame.columns)}.")
    numeric = [c for c in frame.columns if c not in (first, second) and pd.api.types.is_numeric_dtype(frame[c])]
    preferred = [c for c in ("value", "similarity", "cosine", "jsd", "distance")
                 if c in numeric]
    if not (preferred or numeric):
        raise ValueError(f"The layer similarity frame has no numeric value column; it has {list(frame.columns)}.")
    return first, second, (preferred or numeric)[0]


METRIC_NAMES = {"jsd": ("Jensen-Shannon divergence (nats)", "lower = more alike"),
                "cosine": ("cosine similarity", "higher = more alike")}


def layer_similarity_chart(similarity: pd.DataFrame, *, value: Optional[str] = None, cell: int = 44,
                           scheme: str = "viridis") -> alt.LayerChart:
    """Layer x layer matrix (layer_similarity output: layer_a, layer_b, metric, value).

    The value is written in each cell. For a divergence (metric "jsd") the colour
    scale is reversed, so that alike layers are bright under either metric.
    """
    first, second, default = _pair_columns(similarity)
    value = value or default
    require_columns(similarity, (first, second, value), "The layer similarity frame",
                    "attnjax.analysis.layer_similarity(trace)")
    metric = str(similarity["metric"].iloc[0]) if "metric" in similarity.columns else value
    name, direction = METRIC_NAMES.get(metric, (metric, ""))
    n = similarity[first].nunique()
    shown = similarity[[first, second, value]].rename(columns={first: "layer_a", second: "layer_b"})
    values = shown[value].to_numpy(dtype=np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    brightness = (values - low) / (high - low) if high > low else np.zeros_like(values)
    shown["dark_text"] = (1 - brightness if metric == "jsd" else brightness) > 0.6  # on the bright end
    base = alt.Chart(inline(shown), width=n * cell, height=n * cell)
    position = dict(x=alt.X("layer_b:O", title="layer", axis=alt.Axis(labelAngle=0)),
                    y=alt.Y("layer_a:O", title="layer"))
    cells = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", title=metric,
                        scale=alt.Scale(scheme=check_scheme(scheme), zero=False, reverse=metric == "jsd")),
        tooltip=[alt.Tooltip("layer_a:O", title="layer"), alt.Tooltip("layer_b:O", title="other layer"),
                 alt.Tooltip(f"{value}:Q", title=metric, format=".4f")],
        **position)
    text = base.mark_text(fontSize=max(8, cell // 4)).encode(
        text=alt.Text(f"{value}:Q", format=".2~g"),
        color=alt.condition("datum.dark_text", alt.value("#111111"), alt.value("#ffffff")), **position)
    return alt.layer(cells, text).properties(
        title=title("Layer similarity", f"{name} between layers' head-averaged attention ({direction})"))


def focus_chart(focus: pd.DataFrame, *, width: int = 320, height: int = 180) -> alt.HConcatChart:
    """Entropy (with the range over heads) and max weight by layer (focus_by_layer output)."""
    require_columns(focus, ("layer", "entropy", "max_weight"), "The focus frame",
                    "attnjax.analysis.focus_by_layer(trace)")
    columns = ["layer"] + [c for c in ("entropy", "normalized_entropy", "max_weight", "entropy_min", "entropy_max")
                           if c in focus.columns]
    base = alt.Chart(inline(focus, columns), width=width, height=height)
    x = alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0))
    tooltip = [alt.Tooltip("layer:O")] + [alt.Tooltip(f"{c}:Q", format=".3f") for c in columns[1:]]
    entropy_layers = []
    if {"entropy_min", "entropy_max"} <= set(focus.columns):
        entropy_layers.append(base.mark_area(opacity=0.2, color="#4c78a8").encode(
            x=x, y=alt.Y("entropy_min:Q", title="entropy (nats)"), y2="entropy_max:Q"))
    entropy_layers.append(base.mark_line(point=True, color="#4c78a8").encode(
        x=x, y=alt.Y("entropy:Q", title="entropy (nats)"), tooltip=tooltip))
    entropy = alt.layer(*entropy_layers).properties(
        title=title("Entropy by layer", "mean over heads; band: most focused to broadest head"))
    max_weight = base.mark_line(point=alt.OverlayMarkDef(color="#e45756"), color="#e45756").encode(
        x=x, y=alt.Y("max_weight:Q", title="max weight", scale=alt.Scale(domain=[0, 1])), tooltip=tooltip,
    ).properties(title=title("Max weight by layer", "mean over heads and queries"))
    return alt.hconcat(entropy, max_weight).properties(title=title("Focus by layer"))


def token_flow_chart(raw: pd.DataFrame, rollout: Optional[pd.DataFrame] = None, *, position: Optional[int] = None,
                     scheme: str = "viridis", scale: str = "log", heads: bool = False,
                     width: int = FLOW_WIDTH) -> alt.VConcatChart:
    """One token's attention through the layers: raw (mean over heads) above rollout.

    raw: token_flow output (layer, head with -1 = mean, key, key_token, weight).
    rollout: rollout_frame output (layer, query, key, weight); its rows for the
    token's query position are drawn. heads: also offer the single heads in the raw
    panel, chosen with a dropdown. Raw rows travel as one-character codes per
    (layer, head) (attnjax.viz.codes: weights to within 5.4 %), so adding the heads
    costs about one byte per weight.

    Layout for long inputs: the panels are stacked and at most ``width`` px wide
    (FLOW_WIDTH fits the report page at any length), each layer a ROW_HEIGHT px row.
    Both panels share one key axis that zooms and pans (scroll, drag; double-click
    resets); labels that would overlap are thinned and come back when zoomed, and
    every cell's tooltip names its token. scale: "log" by default, because a row is
    one distribution over up to hundreds of keys in which a [CLS]/[SEP] sink of 0.5+
    would leave every other key the darkest colour on a linear scale; "linear",
    "quantile" and "absolute" as in attention_heatmap. The legends give each panel's
    actual range.
    """
    require_columns(raw, ("layer", "head", "key", "weight"), "The token flow frame",
                    "attnjax.analysis.token_flow(trace, position)")
    check_scheme(scheme)
    check_scale(scale)
    if position is None:
        position = int(raw["query"].iloc[0]) if "query" in raw.columns else None
    token = str(raw["query_token"].iloc[0]) if "query_token" in raw.columns else ""
    keys = raw.drop_duplicates("key").sort_values("key")
    key_ids = keys["key"].astype(int).tolist()
    key_tokens = (keys["key_token"].astype(str) if "key_token" in keys.columns
                  else keys["key"].astype(str)).tolist()
    n_keys = len(key_ids)
    labels = label_param("flow_key_labels", [truncate(t) for t in key_tokens])
    key_table = inline([{"index": i, "key": k, "token": t} for i, (k, t) in enumerate(zip(key_ids, key_tokens))])
    shown = raw if heads else raw[raw["head"] == MEAN_HEAD]
    if shown.empty:
        raise ValueError("The token flow frame has no mean-over-heads rows (head == -1).")
    column_of = {k: i for i, k in enumerate(key_ids)}
    code_rows = []
    for (layer, head), rows in shown.groupby(["layer", "head"], sort=True):
        weights = np.zeros(n_keys)
        weights[[column_of[int(k)] for k in rows["key"]]] = rows["weight"].to_numpy(dtype=np.float64)
        code_rows.append({"layer": int(layer), "head": int(head), "codes": codes.encode(weights)})
    panel_width = int(min(width, MAX_CELL * n_keys) // n_keys * n_keys) or int(width)  # whole px per key
    x = alt.X("x0:Q", title="key (attended token)",
              scale=alt.Scale(domain=[-0.5, n_keys - 0.5], nice=False, zero=False),
              axis=alt.Axis(labelExpr=label_expr("flow_key_labels"), labelAngle=-60, labelFontSize=9,
                            labelOverlap="greedy", labelBound=KEY_LABEL_BOUND, tickMinStep=1, tickCount=n_keys,
                            grid=False))
    edges = {"x0": "datum.index - 0.5", "x1": "datum.index + 0.5"}
    y = alt.Y("layer:O", title="layer")
    # One colour domain for the mean and every head, so the head dropdown keeps colours comparable.
    raw_weights = shown["weight"].to_numpy(dtype=np.float64)
    raw_chart = (
        alt.Chart(inline(code_rows), width=panel_width, height=alt.Step(ROW_HEIGHT))
        .transform_filter("datum.head == flow_head" if heads else f"datum.head == {MEAN_HEAD}")
        .transform_calculate(index="sequence(0, length(datum.codes))")
        .transform_flatten(["index"])
        .transform_calculate(weight=codes.vega_decode("substring(datum.codes, datum.index, datum.index + 1)"))
        .transform_lookup(lookup="index", from_=alt.LookupData(key_table, "index", ["key", "token"]),
                          as_=["key", "key_token"])
        .transform_calculate(**edges, **colour_calculation(scale))
        .mark_rect()
        .encode(x=x, x2="x1:Q", y=y,
                color=alt.Color(f"{colour_field(scale)}:Q", legend=colour_legend(scale, raw_weights),
                                scale=colour_scale(scheme, scale, weight_range(raw_weights, scale))),
                tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("key_token:N", title="key"),
                         alt.Tooltip("key:O", title="position"), alt.Tooltip("weight:Q", title="weight (±5%)",
                                                                             format=".3f")])
        .add_params(alt.selection_interval(name="flow_zoom", bind="scales", encodings=["x"]))
    )
    params = [labels]
    if heads:
        head_ids = [MEAN_HEAD] + sorted(int(h) for h in shown["head"].unique() if h != MEAN_HEAD)
        params.append(alt.param(name="flow_head", value=MEAN_HEAD, bind=alt.binding_select(
            options=head_ids, labels=["mean"] + [str(h) for h in head_ids[1:]], name="head ")))
        raw_title = title("Raw attention", "the head chosen below (mean = average over heads)")
    else:
        raw_title = title("Raw attention", "mean over heads, per layer")
    panels = [raw_chart.properties(title=raw_title)]
    if rollout is not None:
        require_columns(rollout, ("layer", "query", "key", "weight"), "The rollout frame",
                        "attnjax.analysis.rollout_frame(trace)")
        rows = rollout[rollout["query"] == position] if position is not None else rollout
        if "sequence" in rows.columns:
            # The token's own sequence: the flow frame names it; else the rollout's first.
            sequence = int(raw["sequence"].iloc[0]) if "sequence" in raw.columns else (
                int(rows["sequence"].iloc[0]) if not rows.empty else 0)
            rows = rows[rows["sequence"] == sequence]
        if rows.empty:
            raise ValueError(
                f"The rollout frame has no rows for query {position}"
                + (f" of sequence {sequence}" if "sequence" in rollout.columns else "")
                + "; build it from the same Trace, e.g. rollout_frame(trace, sequence=...) with "
                "the token flow's sequence."
            )
        lookup = alt.LookupData(inline([{"key": k, "token": t, "index": i}
                                        for i, (k, t) in enumerate(zip(key_ids, key_tokens))]),
                                "key", ["token", "index"])
        panels.append(
            alt.Chart(inline(rows, ["layer", "key", "weight"]), width=panel_width, height=alt.Step(ROW_HEIGHT))
            .transform_lookup(lookup="key", from_=lookup, as_=["key_token", "index"])
            .transform_filter("isValid(datum.index)")
            .transform_calculate(**edges, **colour_calculation(scale))
            .mark_rect()
            .encode(x=x, x2="x1:Q", y=y,
                    color=alt.Color(f"{colour_field(scale)}:Q", legend=colour_legend(scale, rows["weight"].to_numpy()),
                                    scale=colour_scale(scheme, scale, weight_range(rows["weight"].to_numpy(), scale))),
                    tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("key_token:N", title="key"),
                             alt.Tooltip("key:O", title="position"), alt.Tooltip("weight:Q", format=".4f")])
            .properties(title=title("Rollout", "share of the token's representation from each input token"))
        )
    heading = f"Token flow of \u201c{truncate(token, 24)}\u201d" + (
        f" (position {position})" if position is not None else "")
    hint = f"each row: where the token looks after that layer; {scale} colour scale"
    if n_keys * MAX_CELL > width:
        hint += " \u00b7 " + ZOOM_HINT
    return (alt.vconcat(*panels, spacing=24).add_params(*params)
            .resolve_scale(color="independent", x="shared")
            .properties(title=title(heading, hint)))
