"""Next-token explorer for GPT-2 style models: top-k tokens under a temperature slider.

The softmax is recomputed in the browser, as in Transformer Explainer: for the
slider's temperature t, p_v = exp(logit_v / t - log Z(t)) where
log Z(t) = log sum_v exp(logit_v / t) runs over the whole vocabulary. Z needs every
logit, so Python computes log Z for each slider stop (a few dozen numbers) and the
Vega expression looks it up; the probabilities shown are then exact, not
renormalised over the top k.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz.common import inline, label_expr, label_param, require_columns, title
from attnjax.viz.frames import truncate

VISIBLE_SPACE = "\u2423"


def next_token_explorer(top: pd.DataFrame, normalizers: pd.DataFrame, *, context: str = "",
                        width: int = 420) -> alt.VConcatChart:
    """Bars of the top-k next-token probabilities with a temperature slider.

    top: rank, token, logit (from attnjax.viz.next_token_frames); normalizers:
    temperature, log_normalizer on an evenly spaced grid of temperatures (the
    slider's stops). context: the text the prediction follows, for the title.
    """
    require_columns(top, ("rank", "token", "logit"), "The top-k frame", "attnjax.viz.next_token_frames")
    require_columns(normalizers, ("temperature", "log_normalizer"), "The normalizer frame",
                    "attnjax.viz.next_token_frames")
    temps = normalizers["temperature"].to_numpy(dtype=np.float64)
    steps = np.diff(temps)
    if len(temps) < 2 or not np.allclose(steps, steps[0]) or steps[0] <= 0:
        raise ValueError("normalizers must list increasing, evenly spaced temperatures.")
    first, step, last = float(temps[0]), float(steps[0]), float(temps[-1])
    start = min(max(1.0, first), last)
    temperature = alt.param(name="temperature", value=start,
                            bind=alt.binding_range(min=first, max=last, step=step, name="temperature "))
    log_z = alt.param(name="log_normalizers", value=[float(v) for v in normalizers["log_normalizer"]])
    shown = top.assign(label=[truncate(str(t).replace(" ", VISIBLE_SPACE), 16) for t in top["token"]])
    labels = label_param("next_token_labels", dict(zip(shown["rank"].astype(int), shown["label"])))
    k = len(shown)
    index = f"round((temperature - {first!r}) / {step!r})"
    probability = f"exp(datum.logit / temperature - log_normalizers[{index}])"
    base = (
        alt.Chart(inline(shown, ["rank", "token", "logit", "label"]))
        .transform_calculate(probability=probability)
    )
    y = alt.Y("rank:O", title=None, axis=alt.Axis(labelExpr=label_expr("next_token_labels"), labelFontSize=12))
    bars = base.mark_bar(color="#4c78a8").encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability"),
        y=y,
        tooltip=[alt.Tooltip("token:N"), alt.Tooltip("logit:Q", format=".3f"),
                 alt.Tooltip("probability:Q", format=".2%"), alt.Tooltip("rank:O")],
    )
    values = base.mark_text(align="left", dx=4, fontSize=11).encode(
        x="probability:Q", y=y, text=alt.Text("probability:Q", format=".1%"))
    chart = alt.layer(bars, values).properties(width=width, height=alt.Step(22))
    total = (
        base.transform_aggregate(top_mass="sum(probability)")
        .transform_calculate(summary=f"'top {k} hold ' + format(datum.top_mass, '.1%') + "
                                     "' of the probability at temperature ' + format(temperature, '.2f')")
        .mark_text(align="left", fontSize=12)
        .encode(text="summary:N", x=alt.value(0), y=alt.value(10))
        .properties(width=width, height=18)
    )
    heading = "Next token" + (f" after \u201c{truncate(context, 60)}\u201d" if context else "")
    return (
        alt.vconcat(chart, total)
        .add_params(temperature, log_z, labels)
        .properties(title=title(heading, "move the temperature slider: the softmax is recomputed in the page"))
    )
