"""Per-head results on the layer x head grid: taxonomy, anomalies, comparison.

Each builder takes one row per (layer, head) (anomalies: one row per finding) and
draws the model as rows of layers and columns of heads, so the three charts line
up with each other and with the overview.
"""

from __future__ import annotations

from typing import Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz.common import inline, require_columns, score_columns, title

try:  # the taxonomy's own category order, so colours stay fixed across reports
    from attnjax.analysis.taxonomy import CATEGORIES
except ImportError:  # pragma: no cover - analysis not installed
    CATEGORIES = ("previous-token", "next-token", "self", "sink", "sep", "punctuation",
                  "induction", "duplicate", "broad", "local", "mixed")

# One colour per category (Tableau 10 + grey for "mixed"), in CATEGORIES order.
CATEGORY_COLOURS = ("#4e79a7", "#59a14f", "#b07aa1", "#e15759", "#f28e2b", "#edc948",
                    "#76b7b2", "#ff9da7", "#9c755f", "#17becf", "#bab0ac")
# Short names written in the taxonomy cells.
CATEGORY_ABBREVIATIONS = {
    "previous-token": "prev", "next-token": "next", "self": "self", "sink": "sink", "sep": "sep",
    "punctuation": "punct", "induction": "ind", "duplicate": "dup", "broad": "broad", "local": "local",
    "mixed": "",
}
KIND_COLOURS = ("#e15759", "#f28e2b", "#b07aa1", "#4e79a7", "#59a14f", "#edc948", "#76b7b2", "#9c755f")
# The per-head change a comparison chart colours by, first one present.
COMPARISON_VALUES = ("jsd", "js_divergence", "entropy_diff", "divergence", "change", "delta")
ALL_HEADS = -1  # head index of a whole-layer row


def _grid_encoding(cell: int):
    return dict(
        x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer"),
    )


def taxonomy_chart(heads: pd.DataFrame, *, cell: int = 40) -> alt.LayerChart:
    """Heads coloured by category, shaded by how far the deciding score clears its threshold.

    heads: classify_heads output (layer, head, category, and if present decided_by,
    decision_score, decision_threshold, plus the head scores, all in the tooltip).
    Shade: decision_score / decision_threshold clamped to [1, 2] (for "local",
    where a small mean distance decides, threshold / score); "mixed" heads are faint.
    """
    require_columns(heads, ("layer", "head", "category"), "The head categories",
                    "attnjax.analysis.classify_heads(head_scores(trace))")
    shown = heads.copy()
    if {"decision_score", "decision_threshold"} <= set(shown.columns):
        score = shown["decision_score"].to_numpy(dtype=np.float64)
        limit = shown["decision_threshold"].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(shown["category"].to_numpy() == "local", limit / score, score / limit)
        shown["margin"] = np.nan_to_num(ratio, nan=0.0, posinf=2.0)
    else:
        shown["margin"] = 1.0
    shown["abbreviation"] = [CATEGORY_ABBREVIATIONS.get(str(c), str(c)[:5]) for c in shown["category"]]
    n_layers, n_heads = shown["layer"].nunique(), shown["head"].nunique()
    text_columns = [c for c in ("category", "decided_by") if c in shown.columns]
    numbers = score_columns(shown, exclude=("margin", "n_queries"))
    tooltip = ([alt.Tooltip("layer:O"), alt.Tooltip("head:O")] + [alt.Tooltip(f"{c}:N") for c in text_columns]
               + [alt.Tooltip(f"{c}:Q", format=".3f") for c in numbers])
    columns = ["layer", "head", "margin", "abbreviation"] + text_columns + numbers
    base = alt.Chart(inline(shown, columns), width=n_heads * cell, height=n_layers * cell)
    present = [c for c in CATEGORIES if c in set(shown["category"])] + sorted(
        set(shown["category"].astype(str)) - set(CATEGORIES))
    colours = [CATEGORY_COLOURS[CATEGORIES.index(c)] if c in CATEGORIES else "#666666" for c in present]
    cells = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("category:N", scale=alt.Scale(domain=present, range=colours), title="category"),
        opacity=alt.Opacity("margin:Q", scale=alt.Scale(domain=[0, 1, 2], range=[0.25, 0.55, 1.0], clamp=True),
                            legend=None),
        tooltip=tooltip, **_grid_encoding(cell),
    )
    labels = base.mark_text(fontSize=max(8, cell // 4), color="#111").encode(
        text="abbreviation:N", **_grid_encoding(cell))
    return alt.layer(cells, labels).properties(
        title=title("Head taxonomy", "colour: category · shade: how far the deciding score clears its threshold"))


def anomaly_chart(anomalies: pd.DataFrame, heads: pd.DataFrame, *, cell: int = 40) -> alt.LayerChart:
    """Flagged heads on the layer x head grid, coloured by kind, with the reasons in the tooltip.

    anomalies: detect_anomalies output (layer, head, kind, score, threshold, detail),
    one row per finding (a head may have several). heads: any per-head frame with
    layer and head (e.g. head_scores) giving the full grid. Rows without a head
    (layer-wide findings) are drawn on every head of their layer.
    """
    require_columns(heads, ("layer", "head"), "The head grid", "attnjax.analysis.head_scores(trace)")
    grid = heads[["layer", "head"]].drop_duplicates().reset_index(drop=True)
    n_layers, n_heads = grid["layer"].nunique(), grid["head"].nunique()
    if not isinstance(anomalies, pd.DataFrame):
        raise TypeError(f"anomalies must be a DataFrame from detect_anomalies; got {type(anomalies).__name__}.")
    missing = [c for c in ("layer", "head", "kind") if c not in anomalies.columns]
    if missing:
        raise ValueError(f"The anomalies frame lacks column(s) {missing}; build it with "
                         "attnjax.analysis.detect_anomalies(...).")
    found = anomalies[anomalies["flagged"].astype(bool)] if "flagged" in anomalies.columns else anomalies
    found = found.copy()
    whole_layer = found["head"].isna() | (found["head"] == ALL_HEADS)
    if whole_layer.any():  # layer-wide findings: drawn on every head of the layer
        layer_wide = found[whole_layer].drop(columns="head").merge(grid, on="layer")
        found = pd.concat([found[~whole_layer], layer_wide], ignore_index=True)
    flagged = []
    for (layer, head), rows in found.groupby(["layer", "head"], sort=True):
        kinds = list(dict.fromkeys(str(k) for k in rows["kind"]))
        reasons = [_reason(row) for row in rows.to_dict("records")]
        flagged.append({"layer": int(layer), "head": int(head), "kind": kinds[0] if len(kinds) == 1 else "several",
                        "kinds": ", ".join(kinds), "findings": len(rows), "reasons": " | ".join(reasons)})
    flagged = pd.DataFrame(flagged, columns=["layer", "head", "kind", "kinds", "findings", "reasons"])
    base_grid = alt.Chart(inline(grid), width=n_heads * cell, height=n_layers * cell).mark_rect(
        color="#f0f0f0", stroke="white", strokeWidth=1).encode(
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O")], **_grid_encoding(cell))
    kinds = sorted(set(flagged["kind"]))
    findings = int(anomalies["flagged"].astype(bool).sum()) if "flagged" in anomalies.columns else len(anomalies)
    subtitle = (f"{findings} finding(s) on {len(flagged)} head(s); whole-layer findings cover their row"
                if len(flagged)
                else "no anomalies found")
    layers = [base_grid]
    if len(flagged):
        marks = alt.Chart(inline(flagged)).mark_rect(stroke="white", strokeWidth=1).encode(
            color=alt.Color("kind:N", scale=alt.Scale(domain=kinds, range=list(KIND_COLOURS[:len(kinds)]) or None),
                            title="kind"),
            tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("kinds:N"),
                     alt.Tooltip("reasons:N")],
            **_grid_encoding(cell),
        )
        counts = alt.Chart(inline(flagged)).mark_text(color="white", fontSize=max(8, cell // 4)).encode(
            text="findings:Q", **_grid_encoding(cell))
        layers += [marks, counts]
    return alt.layer(*layers).properties(title=title("Anomalies", subtitle))


def _reason(row) -> str:
    parts = [str(row.get("kind", ""))]
    detail = row.get("detail")
    if isinstance(detail, str) and detail:
        parts.append(detail)
    score, threshold = row.get("score"), row.get("threshold")
    if _finite(score) and _finite(threshold):
        parts.append(f"score {float(score):.3g} vs threshold {float(threshold):.3g}")
    return ": ".join(parts[:2]) + ("" if len(parts) < 3 else f" ({parts[2]})")


def _finite(value) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def comparison_chart(changes: pd.DataFrame, *, value: Optional[str] = None, labels: Sequence[str] = ("A", "B"),
                     cell: int = 40) -> alt.LayerChart:
    """Per-head change between two traces on the layer x head grid.

    changes: compare output, one row per (layer, head) (jsd, s_a / s_b / s_diff per
    score, category_a, category_b, category_changed). ``value``: the column to
    colour by (default the first of COMPARISON_VALUES with finite values). A column
    with both signs gets a diverging scale centred on 0. Heads whose category
    changed are marked with their old and new category; the tooltip has the
    category and the score changes.
    """
    require_columns(changes, ("layer", "head"), "The comparison", "attnjax.analysis.compare(trace_a, trace_b)")
    numbers = score_columns(changes)
    if value is None:
        usable = [c for c in numbers if np.isfinite(changes[c].to_numpy(dtype=np.float64)).any()]
        value = next((c for c in COMPARISON_VALUES if c in usable), usable[0] if usable else None)
    if value is None or value not in changes.columns:
        raise ValueError(f"The comparison has no numeric column {value!r} to colour by; "
                         f"it has {list(changes.columns)}.")
    values = changes[value].to_numpy(dtype=np.float64)
    finite = values[np.isfinite(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        if finite.size and finite.min() < 0 < finite.max():
            bound = float(np.abs(finite).max())
            scale = alt.Scale(scheme="redblue", domain=[-bound, 0, bound], reverse=True)
            light = np.abs(values) / bound < 0.5             # near the white middle
        else:
            scale = alt.Scale(scheme="viridis", zero=False)
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            light = (values - low) / (high - low if high > low else 1.0) > 0.6  # yellow end
    diffs = [c for c in numbers if c.endswith("_diff")]
    shown_numbers = [value] + [c for c in (diffs or numbers) if c != value]
    shown = changes.copy()
    shown["light"] = np.nan_to_num(light).astype(bool)
    text_columns = [c for c in ("category_a", "category_b") if c in shown.columns]
    if "category_changed" in shown.columns and text_columns == ["category_a", "category_b"]:
        changed = shown["category_changed"].astype(bool).to_numpy()
        shown["mark"] = np.where(changed, [f"{CATEGORY_ABBREVIATIONS.get(a, a)[:5]}\u2192"
                                           f"{CATEGORY_ABBREVIATIONS.get(b, b)[:5]}"
                                           for a, b in zip(shown["category_a"], shown["category_b"])], "")
    else:
        shown["mark"] = ""
    n_layers, n_heads = shown["layer"].nunique(), shown["head"].nunique()
    tooltip = ([alt.Tooltip("layer:O"), alt.Tooltip("head:O")] + [alt.Tooltip(f"{c}:N") for c in text_columns]
               + [alt.Tooltip(f"{c}:Q", format=".4f") for c in shown_numbers])
    base = alt.Chart(inline(shown, ["layer", "head", "mark", "light"] + text_columns + shown_numbers),
                     width=n_heads * cell, height=n_layers * cell)
    cells = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color(f"{value}:Q", scale=scale, title=value), tooltip=tooltip, **_grid_encoding(cell))
    marks = base.mark_text(fontSize=max(7, cell // 5)).encode(
        text="mark:N", color=alt.condition("datum.light", alt.value("#111111"), alt.value("#ffffff")),
        **_grid_encoding(cell))
    return alt.layer(cells, marks).properties(
        title=title(f"Change per head: {labels[0]} \u2192 {labels[1]}",
                    f"colour: {value}; text: category before \u2192 after where it changed"))
