"""Layer-level views: similarity between layers, focus by layer, one token's flow."""

from __future__ import annotations

from typing import Optional

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz import codes
from attnjax.viz.common import check_scheme, inline, label_expr, label_param, require_columns, title
from attnjax.viz.frames import truncate

MEAN_HEAD = -1  # token_flow's head index of the mean over heads


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
                     scheme: str = "viridis", heads: bool = False, width: int = 440) -> alt.HConcatChart:
    """One token's attention through the layers: raw (mean over heads) beside rollout.

    raw: token_flow output (layer, head with -1 = mean, key, key_token, weight).
    rollout: rollout_frame output (layer, query, key, weight); its rows for the
    token's query position are drawn. heads: also offer the single heads in the raw
    panel, chosen with a dropdown. Raw rows travel as one-character codes per
    (layer, head) (attnjax.viz.codes: weights to within 5.4 %), so adding the heads
    costs about one byte per weight.
    """
    require_columns(raw, ("layer", "head", "key", "weight"), "The token flow frame",
                    "attnjax.analysis.token_flow(trace, position)")
    check_scheme(scheme)
    if position is None:
        position = int(raw["query"].iloc[0]) if "query" in raw.columns else None
    token = str(raw["query_token"].iloc[0]) if "query_token" in raw.columns else ""
    keys = raw.drop_duplicates("key").sort_values("key")
    key_ids = keys["key"].astype(int).tolist()
    key_tokens = (keys["key_token"].astype(str) if "key_token" in keys.columns
                  else keys["key"].astype(str)).tolist()
    labels = label_param("flow_key_labels", {k: truncate(t) for k, t in zip(key_ids, key_tokens)})
    key_table = inline([{"index": i, "key": k, "token": t} for i, (k, t) in enumerate(zip(key_ids, key_tokens))])
    shown = raw if heads else raw[raw["head"] == MEAN_HEAD]
    if shown.empty:
        raise ValueError("The token flow frame has no mean-over-heads rows (head == -1).")
    column_of = {k: i for i, k in enumerate(key_ids)}
    code_rows = []
    for (layer, head), rows in shown.groupby(["layer", "head"], sort=True):
        weights = np.zeros(len(key_ids))
        weights[[column_of[int(k)] for k in rows["key"]]] = rows["weight"].to_numpy(dtype=np.float64)
        code_rows.append({"layer": int(layer), "head": int(head), "codes": codes.encode(weights)})
    step = max(3, min(24, width // max(len(key_ids), 1)))
    x = alt.X("key:O", title="key (attended token)",
              axis=alt.Axis(labelExpr=label_expr("flow_key_labels"), labelAngle=-60, labelFontSize=9,
                            labelOverlap="greedy"))
    y = alt.Y("layer:O", title="layer")
    colour = alt.Color("weight:Q", scale=alt.Scale(scheme=scheme, zero=False), title="weight")
    raw_chart = (
        alt.Chart(inline(code_rows), width=alt.Step(step), height=alt.Step(18))
        .transform_filter("datum.head == flow_head" if heads else f"datum.head == {MEAN_HEAD}")
        .transform_calculate(index="sequence(0, length(datum.codes))")
        .transform_flatten(["index"])
        .transform_calculate(weight=codes.vega_decode("substring(datum.codes, datum.index, datum.index + 1)"))
        .transform_lookup(lookup="index", from_=alt.LookupData(key_table, "index", ["key", "token"]),
                          as_=["key", "key_token"])
        .mark_rect()
        .encode(x=x, y=y, color=colour,
                tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("key_token:N", title="key"),
                         alt.Tooltip("key:O", title="position"), alt.Tooltip("weight:Q", title="weight (±5%)",
                                                                             format=".3f")])
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
        lookup = alt.LookupData(inline([{"key": k, "token": t} for k, t in zip(key_ids, key_tokens)]),
                                "key", ["token"])
        panels.append(
            alt.Chart(inline(rows, ["layer", "key", "weight"]), width=alt.Step(step), height=alt.Step(18))
            .transform_lookup(lookup="key", from_=lookup, as_=["key_token"])
            .mark_rect()
            .encode(x=x, y=y, color=colour,
                    tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("key_token:N", title="key"),
                             alt.Tooltip("key:O", title="position"), alt.Tooltip("weight:Q", format=".4f")])
            .properties(title=title("Rollout", "share of the token's representation from each input token"))
        )
    heading = f"Token flow of \u201c{truncate(token, 24)}\u201d" + (
        f" (position {position})" if position is not None else "")
    return (alt.hconcat(*panels, spacing=28).add_params(*params).resolve_scale(color="independent")
            .properties(title=title(heading, "each row: where the token looks after that layer")))
