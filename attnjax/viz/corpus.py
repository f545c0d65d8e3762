"""Charts of a corpus profile (attnjax.profile's frame: one row per head, with each score's
corpus mean and its standard deviation across texts in ``<score>_std``).

Each builder takes DataFrames only: the stability grid, the score spreads across texts,
and the corpus anomaly grid. Focus by layer reuses attnjax.viz.layers.focus_chart on
``corpus_focus(frame)``.
"""

from __future__ import annotations

from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz.common import inline, require_columns, title
from attnjax.viz.grids import CATEGORY_ABBREVIATIONS

# Scores shown as spreads across texts (first those that decide categories).
SPREAD_SCORES = ("normalized_entropy", "max_weight", "previous_token", "first_token", "sep", "punctuation",
                 "induction", "duplicate")  # a score that is NaN throughout (no q, k recorded) is left out
SPREAD_PER_ROW = 4  # panels of ~280 px a row: within the page's width
MADE_BY = "attnjax.profile(model, texts)"


def corpus_focus(frame: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean over heads of entropy, normalized_entropy and max_weight, and the
    entropy of the most focused and broadest head (focus_chart's columns)."""
    require_columns(frame, ("layer", "entropy", "normalized_entropy", "max_weight"), "The profile", MADE_BY)
    grouped = frame.groupby("layer", sort=True)
    focus = grouped[["entropy", "normalized_entropy", "max_weight"]].mean().reset_index()
    focus["entropy_min"] = grouped["entropy"].min().to_numpy()
    focus["entropy_max"] = grouped["entropy"].max().to_numpy()
    return focus


def stability_chart(frame: pd.DataFrame, *, cell: int = 40) -> alt.LayerChart:
    """Layer x head grid: colour = the spread across texts of the score that decided each
    head's category (its ``<decided_by>_std`` over the threshold; light = stable), label
    = the category. Mixed heads (nothing decided) show the normalized_entropy spread."""
    require_columns(frame, ("layer", "head", "category", "decided_by", "decision_threshold"), "The profile", MADE_BY)
    shown = frame[["layer", "head", "category", "decided_by", "decision_score", "decision_threshold"]].copy()
    deciding = [name if name else "normalized_entropy" for name in frame["decided_by"]]
    spread = np.array([frame[f"{name}_std"].iloc[row] if f"{name}_std" in frame.columns else np.nan
                       for row, name in enumerate(deciding)], np.float64)
    threshold = frame["decision_threshold"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        shown["relative_spread"] = np.where(np.isfinite(threshold) & (threshold > 0), spread / threshold, spread)
    shown["spread"] = spread
    shown["score"] = deciding
    shown["abbreviation"] = [CATEGORY_ABBREVIATIONS.get(str(c), str(c)[:5]) for c in shown["category"]]
    n_layers, n_heads = shown["layer"].nunique(), shown["head"].nunique()
    columns = ["layer", "head", "category", "abbreviation", "score", "decision_score", "spread", "relative_spread"]
    base = alt.Chart(inline(shown, columns), width=n_heads * cell, height=n_layers * cell)
    encoding = dict(x=alt.X("head:O", axis=alt.Axis(labelAngle=0)), y=alt.Y("layer:O"))
    tooltip = [alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("category:N"),
               alt.Tooltip("score:N", title="deciding score"), alt.Tooltip("decision_score:Q", format=".3f"),
               alt.Tooltip("spread:Q", format=".3f", title="std across texts")]
    cells = base.mark_rect(stroke="white").encode(
        color=alt.Color("relative_spread:Q", title="std / threshold", scale=alt.Scale(scheme="orangered", domain=[0, 1],
                                                                                       clamp=True)),
        tooltip=tooltip, **encoding)
    labels = base.mark_text(fontSize=max(8, cell // 4), color="#111").encode(text="abbreviation:N", **encoding)
    return alt.layer(cells, labels).properties(
        title=title("Head stability", "colour: spread across texts of the deciding score (light: the head plays "
                                      "its role on every text)"))


def spread_chart(frame: pd.DataFrame, scores: Sequence[str] = SPREAD_SCORES, *, width: int = 220,
                 height: int = 160) -> alt.VConcatChart:
    """Per score, every head's corpus mean (point) and mean +- one standard deviation
    across texts (rule), by layer: how a score is distributed over the corpus's texts."""
    require_columns(frame, ("layer", "head"), "The profile", MADE_BY)
    charts = []
    for score in scores:
        if score not in frame.columns or f"{score}_std" not in frame.columns or not frame[score].notna().any():
            continue
        long = pd.DataFrame({"layer": frame["layer"], "head": frame["head"], "mean": frame[score],
                             "std": frame[f"{score}_std"]})
        long["low"], long["high"] = long["mean"] - long["std"], long["mean"] + long["std"]
        base = alt.Chart(inline(long), width=width, height=height)
        x = alt.X("layer:O", axis=alt.Axis(labelAngle=0))
        tooltip = [alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("mean:Q", format=".3f"),
                   alt.Tooltip("std:Q", format=".3f")]
        rules = base.mark_rule(opacity=0.35).encode(x=x, xOffset="head:N", y=alt.Y("low:Q", title=score), y2="high:Q")
        points = base.mark_point(filled=True, size=25).encode(x=x, xOffset="head:N", y="mean:Q", tooltip=tooltip)
        charts.append(alt.layer(rules, points).properties(title=title(score)))
    if not charts:
        raise ValueError("The profile has none of the scores to chart; pass attnjax.profile's frame.")
    rows = [alt.hconcat(*charts[i:i + SPREAD_PER_ROW]) for i in range(0, len(charts), SPREAD_PER_ROW)]
    return alt.vconcat(*rows).properties(
        title=title("Head scores across texts", "point: corpus mean of each head · bar: +- one standard deviation "
                                                "across texts"))


def corpus_anomaly_chart(frame: pd.DataFrame, *, cell: int = 36) -> alt.HConcatChart:
    """Two layer x head grids over the corpus: the share of queries whose attention is
    concentrated on one key (``concentrated``) and the mean unexplained argmax jump
    (``jump``), with where the concentrated queries land in the tooltip. Both count only
    texts long enough to judge (attnjax.analysis.anomalies; the minimums are in
    ``frame.attrs["anomaly_parameters"]``); a head without any such text has no colour."""
    require_columns(frame, ("layer", "head", "concentrated", "jump"), "The profile", MADE_BY)
    parameters = frame.attrs.get("anomaly_parameters", {})
    concentrated_from = _from_texts(parameters.get("min_tokens_concentrated"))
    jump_from = _from_texts(parameters.get("min_tokens_jump"))
    shown = frame[["layer", "head", "concentrated", "jump"]].copy()
    shown["concentrated_on"] = frame["concentrated_on"] if "concentrated_on" in frame.columns else ""
    n_layers, n_heads = shown["layer"].nunique(), shown["head"].nunique()
    base = alt.Chart(inline(shown), width=n_heads * cell, height=n_layers * cell)
    encoding = dict(x=alt.X("head:O", axis=alt.Axis(labelAngle=0)), y=alt.Y("layer:O"))
    tooltip = [alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("concentrated:Q", format=".3f"),
               alt.Tooltip("concentrated_on:N"), alt.Tooltip("jump:Q", format=".4f")]
    concentrated = base.mark_rect(stroke="white").encode(
        color=alt.Color("concentrated:Q", scale=alt.Scale(scheme="reds", domain=[0, 1]), title="concentrated"),
        tooltip=tooltip, **encoding).properties(title=title("Concentrated queries",
                                                            f"share of queries{concentrated_from}"))
    jump = base.mark_rect(stroke="white").encode(
        color=alt.Color("jump:Q", scale=alt.Scale(scheme="purples"), title="jump"),
        tooltip=tooltip, **encoding).properties(title=title("Argmax jumps", f"mean unexplained jump{jump_from}"))
    return alt.hconcat(concentrated, jump).resolve_scale(color="independent").properties(
        title=title("Anomalies over the corpus"))


def _from_texts(minimum) -> str:
    return "" if minimum is None else f" (texts of >= {int(minimum)} tokens)"
