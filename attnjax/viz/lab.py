"""Charts of a training run's history (attnjax.lab.train's TrainResult.history).

The history has one row per (logged step, layer, head): step, tokens, seconds, loss,
then head_scores's columns and classify_heads's category on the fixed probe batch.

- ``loss_chart``: the training loss (mean since the previous log) against the step;
- ``category_chart``: the layer x head grid of categories at one logged step, with a
  step slider to move through training;
- ``induction_chart``: each head's induction score against the step, one line per head,
  with the 0.4 threshold (classify_heads's): the phase change shows as the jump.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from attnjax.viz.common import inline, require_columns, title
from attnjax.viz.grids import CATEGORIES, CATEGORY_ABBREVIATIONS, CATEGORY_COLOURS

MADE_BY = "attnjax.lab.train(...).history"
INDUCTION_THRESHOLD = 0.4  # HeadThresholds.induction


def loss_chart(history: pd.DataFrame, *, width: int = 480, height: int = 240) -> alt.Chart:
    """The training loss against the step (one point per logged step)."""
    require_columns(history, ("step", "loss"), "The training history", MADE_BY)
    losses = history.drop_duplicates("step")[["step", "loss"] + (["seconds"] if "seconds" in history else [])]
    tooltip = [alt.Tooltip("step:Q"), alt.Tooltip("loss:Q", format=".3f")] + (
        [alt.Tooltip("seconds:Q", format=".0f")] if "seconds" in losses else [])
    return alt.Chart(inline(losses), width=width, height=height, title=title(
        "Training loss", "mean next-token cross-entropy since the previous log")).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("loss:Q", title="loss (nats)", scale=alt.Scale(zero=False)),
        tooltip=tooltip)


def head_rows(history: pd.DataFrame, columns) -> pd.DataFrame:
    require_columns(history, ("step", "layer", "head") + tuple(columns), "The training history", MADE_BY)
    rows = history.dropna(subset=["layer", "head"]).copy()
    rows["layer"] = rows["layer"].astype(int)
    rows["head"] = rows["head"].astype(int)
    return rows


def category_chart(history: pd.DataFrame, *, cell: int = 40) -> alt.Chart:
    """Head categories on the layer x head grid, one logged step at a time (a slider)."""
    rows = head_rows(history, ("category",))
    rows["abbreviation"] = [CATEGORY_ABBREVIATIONS.get(str(c), str(c)[:5]) for c in rows["category"]]
    scores = [c for c in ("previous_token", "induction", "duplicate", "first_token", "normalized_entropy")
              if c in rows]
    steps = sorted(rows["step"].unique())
    rows["log_point"] = rows["step"].map({step: index for index, step in enumerate(steps)})
    # The slider moves over the logged steps in order (they need not be evenly spaced).
    slider = alt.param(name="log_point_shown", value=len(steps) - 1, bind=alt.binding_range(
        min=0, max=max(len(steps) - 1, 1), step=1, name="logged step (0 = first) "))
    present = [c for c in CATEGORIES if c in set(rows["category"])]
    colours = [CATEGORY_COLOURS[CATEGORIES.index(c)] for c in present]
    base = alt.Chart(inline(rows, ["step", "log_point", "layer", "head", "category", "abbreviation"] + scores),
                     width=rows["head"].nunique() * cell, height=rows["layer"].nunique() * cell,
                     title=title("Head categories during training",
                                 "on the fixed probe batch; move the slider through the logged steps"))
    shown = base.transform_filter(alt.datum.log_point == slider)
    encoding = dict(x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)), y=alt.Y("layer:O", title="layer"))
    cells = shown.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("category:N", scale=alt.Scale(domain=present, range=colours), title="category"),
        tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("layer:O"), alt.Tooltip("head:O"), alt.Tooltip("category:N")]
        + [alt.Tooltip(f"{c}:Q", format=".3f") for c in scores], **encoding)
    labels = shown.mark_text(fontSize=10, color="white").encode(text="abbreviation:N", **encoding)
    step_label = shown.transform_aggregate(step="max(step)").transform_calculate(
        label="'step ' + datum.step").mark_text(align="left", fontSize=12).encode(
        text="label:N", y=alt.value(-8), x=alt.value(0))
    return (cells + labels + step_label).add_params(slider)


def induction_chart(history: pd.DataFrame, *, width: int = 480, height: int = 240) -> alt.LayerChart:
    """Each head's induction score over the steps, one line per head (the phase change)."""
    rows = head_rows(history, ("induction",))
    rows["head_name"] = [f"L{layer}.H{head}" for layer, head in zip(rows["layer"], rows["head"])]
    lines = alt.Chart(inline(rows, ["step", "layer", "head", "head_name", "induction"]), width=width,
                      height=height, title=title("Induction score of every head",
                                                 "on the fixed probe batch; dashed: the induction threshold")
                      ).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("induction:Q", title="induction score", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("head_name:N", title="head"), strokeDash=alt.StrokeDash("layer:O", title="layer"),
        tooltip=[alt.Tooltip("head_name:N", title="head"), alt.Tooltip("step:Q"),
                 alt.Tooltip("induction:Q", format=".3f")])
    rule = alt.Chart(inline([{"threshold": INDUCTION_THRESHOLD}])).mark_rule(
        strokeDash=[4, 4], color="grey").encode(y="threshold:Q")
    return lines + rule


def training_charts(history: pd.DataFrame) -> alt.VConcatChart:
    """The three charts stacked: loss, categories (slider), induction scores."""
    return alt.vconcat(loss_chart(history), category_chart(history), induction_chart(history)).resolve_scale(
        color="independent", strokeDash="independent")
