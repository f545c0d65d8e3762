"""Charts of a generation: what each new token looked at, and how much of it went to each prompt span.

``generation_frames`` turns a Generation (attnjax.generate) into DataFrames; the chart
builders take only those frames:

- ``generation_view``: the generated tokens (click one to choose a step), the step's
  top-k next-token bars under a temperature slider (exact probabilities over the whole
  vocabulary, recomputed in the page as in attnjax.viz.next_token), and the attention
  of the row that chose the token over the prompt, one heat strip per layer (mean
  over heads);
- ``span_mass_chart``: attention mass on each prompt span (attnjax.analysis
  .span_mass_by_step, mean over heads), by step (mean over layers) and by layer (mean
  over steps).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import altair as alt
import numpy as np
import pandas as pd

from attnjax.analysis._common import ALL_HEADS
from attnjax.viz.common import inline, label_expr, label_param, require_columns, title, visible_text
from attnjax.viz.frames import next_token_frames, truncate
from attnjax.viz.html import PAGE_CONTENT_WIDTH
from attnjax.viz.next_token import VISIBLE_SPACE

STRIP_LEGEND_WIDTH = 160  # px the heat strip leaves for its colour legend
MAX_PROMPT_KEYS = 256   # prompt keys drawn in the heat strips; a longer prompt shows its last ones


def _shown(token: str, limit: int = 14) -> str:
    return truncate(visible_text(str(token)).replace(" ", VISIBLE_SPACE), limit)


def generation_frames(generation, *, k: int = 10, decode: Optional[Callable[[int], str]] = None
                      ) -> Tuple[pd.DataFrame, ...]:
    """(steps, top, normalizers, strips) DataFrames of a Generation.

    steps: step, token_id, token (the new tokens); top: step, rank, token_id, token,
    logit (each step's k most likely next tokens); normalizers: step, temperature,
    log_normalizer (next_token_frames per step); strips: step, layer, key, key_token,
    weight: the head-mean attention of the row that chose each new token (row
    prompt_length - 1 + step) over the prompt's keys (the last MAX_PROMPT_KEYS of them).
    Needs the generation's trace with attention (Capture(attention=True)). decode: token
    id -> text for the top-k tokens (e.g. lambda i: model.tokenizer.decode([i])); by
    default the generation's own token strings, "#id" for ids it does not hold.
    """
    trace = generation.trace
    if trace is None or trace.attention is None:
        raise ValueError("generation_frames needs the attention rows: generate with "
                         "capture=attnjax.Capture(attention=True).")
    tokenizer_decode = generation.tokens  # display strings of every id
    known = dict(zip(generation.ids.tolist(), generation.tokens))
    vocab_decode = decode or (lambda i: known.get(int(i), f"#{int(i)}"))
    steps = pd.DataFrame({"step": np.arange(generation.steps), "token_id": generation.new_ids.astype(np.int64),
                          "token": list(generation.new_tokens)})
    tops, norms = [], []
    for step, logits in enumerate(generation.logits):
        top, normalizers = next_token_frames(logits, vocab_decode, k=k)
        tops.append(top.assign(step=step))
        norms.append(normalizers.assign(step=step))
    prompt = generation.prompt_length
    first_key = max(0, prompt - MAX_PROMPT_KEYS)
    rows = generation.choosing_rows  # (S,)
    attention = np.asarray(trace.attention, np.float64)[:, 0]  # (L, H, T, T)
    weights = attention[:, :, rows, first_key:prompt].mean(axis=1)  # (L, S, P')
    layers, num_steps, keys = weights.shape
    strips = pd.DataFrame({
        "step": np.tile(np.repeat(np.arange(num_steps), keys), layers),
        "layer": np.repeat(np.asarray(trace.layers or range(layers)), num_steps * keys),
        "key": np.tile(np.arange(first_key, prompt), layers * num_steps),
        "weight": weights.reshape(-1),
    })
    strips["key_token"] = [tokenizer_decode[i] for i in strips["key"]]
    return steps, pd.concat(tops, ignore_index=True), pd.concat(norms, ignore_index=True), strips


def generation_view(steps: pd.DataFrame, top: pd.DataFrame, normalizers: pd.DataFrame, strips: pd.DataFrame,
                    *, width: int = 520) -> alt.VConcatChart:
    """Generated tokens (click one), its next-token bars with a temperature slider, and
    its attention over the prompt per layer (frames from ``generation_frames``)."""
    require_columns(steps, ("step", "token"), "The steps frame", "attnjax.viz.generation_frames")
    require_columns(top, ("step", "rank", "token", "logit"), "The top-k frame", "attnjax.viz.generation_frames")
    require_columns(normalizers, ("step", "temperature", "log_normalizer"), "The normalizer frame",
                    "attnjax.viz.generation_frames")
    require_columns(strips, ("step", "layer", "key", "key_token", "weight"), "The strips frame",
                    "attnjax.viz.generation_frames")
    temps = np.sort(normalizers["temperature"].unique()).astype(np.float64)
    gaps = np.diff(temps)
    if len(temps) < 2 or not np.allclose(gaps, gaps[0]) or gaps[0] <= 0:
        raise ValueError("normalizers must list increasing, evenly spaced temperatures.")
    first, gap, last = float(temps[0]), float(gaps[0]), float(temps[-1])
    table = normalizers.pivot(index="step", columns="temperature", values="log_normalizer").sort_index()
    temperature = alt.param(name="temperature", value=min(max(1.0, first), last),
                            bind=alt.binding_range(min=first, max=last, step=gap, name="temperature "))
    log_z = alt.param(name="step_log_normalizers", value=[[float(v) for v in row] for row in table.to_numpy()])
    chosen = alt.selection_point(name="chosen", fields=["step"], value=[{"step": 0}], on="click",
                                 clear=False, toggle=False)

    shown_steps = steps.assign(label=[_shown(t) for t in steps["token"]])
    picker = (
        alt.Chart(inline(shown_steps, ["step", "token", "label"]))
        .mark_text(fontSize=13, align="center", baseline="middle")
        .encode(x=alt.X("step:O", title="generated token (click one)", axis=alt.Axis(labelAngle=0)),
                text="label:N",
                color=alt.condition(chosen, alt.value("#d62728"), alt.value("#333333")),
                tooltip=[alt.Tooltip("step:O"), alt.Tooltip("token:N")])
        .add_params(chosen)
        .properties(width=width, height=28)
    )

    index = f"round((temperature - {first!r}) / {gap!r})"
    shown_top = top.assign(label=[_shown(t, 16) for t in top["token"]])
    y = alt.Y("rank:O", title=None, axis=alt.Axis(labels=False, ticks=False))  # the names are a text layer
    bars_base = (
        alt.Chart(inline(shown_top, ["step", "rank", "token", "logit", "label"]))
        .transform_filter(chosen)
        .transform_calculate(probability=f"exp(datum.logit / temperature - step_log_normalizers[datum.step][{index}])")
    )
    bars = bars_base.mark_bar(color="#4c78a8").encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability of the next token"),
        y=y, tooltip=[alt.Tooltip("token:N"), alt.Tooltip("logit:Q", format=".3f"),
                      alt.Tooltip("probability:Q", format=".2%"), alt.Tooltip("rank:O")])
    names = bars_base.mark_text(align="right", dx=-4, fontSize=11).encode(x=alt.value(0), y=y, text="label:N")
    values = bars_base.mark_text(align="left", dx=4, fontSize=11).encode(
        x="probability:Q", y=y, text=alt.Text("probability:Q", format=".1%"))
    explorer = alt.layer(bars, names, values).properties(width=width - 120, height=alt.Step(20))

    keys = strips[["key", "key_token"]].drop_duplicates().sort_values("key")
    key_labels = label_param("prompt_key_labels", {int(k): _shown(t, 10) for k, t in zip(keys["key"],
                                                                                         keys["key_token"])})
    strip = (
        alt.Chart(inline(strips, ["step", "layer", "key", "key_token", "weight"]))
        .transform_filter(chosen)
        .mark_rect()
        .encode(x=alt.X("key:O", title="prompt token",
                        axis=alt.Axis(labelExpr=label_expr("prompt_key_labels"), labelAngle=-60,
                                      labelOverlap="greedy")),
                y=alt.Y("layer:O", title="layer"),
                color=alt.Color("weight:Q", scale=alt.Scale(scheme="viridis"), title="attention"),
                tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("key:O"), alt.Tooltip("key_token:N"),
                         alt.Tooltip("weight:Q", format=".3f")])
        .add_params(key_labels)
        # 10 px a prompt token, within the page beside the legend; labels thin out when they would
        # overlap (every token is in the tooltip)
        .properties(width=min(max(width, 10 * len(keys)), PAGE_CONTENT_WIDTH - STRIP_LEGEND_WIDTH),
                    height=alt.Step(14))
    )
    return (
        alt.vconcat(picker, explorer, strip)
        .add_params(temperature, log_z)
        .properties(title=title("What each new token read", [
            "click a generated token: its next-token choices (move the temperature slider: the softmax is "
            "recomputed in the page)", "and the attention of the row that chose it over the prompt, per layer "
            "(mean over heads)"]))
    )


def span_mass_chart(frame: pd.DataFrame, *, width: int = 360) -> alt.HConcatChart:
    """Attention mass on each prompt span by step and by layer (frame from
    attnjax.analysis.span_mass_by_step; its head-mean rows are drawn)."""
    require_columns(frame, ("step", "layer", "head", "key_span", "mass"), "The span-mass frame",
                    "attnjax.analysis.span_mass_by_step")
    means = frame[frame["head"] == ALL_HEADS]
    if means.empty:
        raise ValueError("The span-mass frame has no head-mean rows (head == -1); pass span_mass_by_step's frame.")
    base = alt.Chart(inline(means, ["step", "layer", "key_span", "mass"]))
    colour = alt.Color("key_span:N", title="prompt span")
    by_step = (
        base.mark_line(point=True)
        .encode(x=alt.X("step:Q", title="generation step", axis=alt.Axis(tickMinStep=1)),
                y=alt.Y("mean(mass):Q", title="attention mass (mean over layers and heads)",
                        scale=alt.Scale(domain=[0, 1])),
                color=colour, tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("key_span:N"),
                                       alt.Tooltip("mean(mass):Q", format=".1%")])
        .properties(width=width, height=220, title="by step")
    )
    by_layer = (
        base.mark_line(point=True)
        .encode(x=alt.X("layer:O", title="layer"),
                y=alt.Y("mean(mass):Q", title="attention mass (mean over steps and heads)",
                        scale=alt.Scale(domain=[0, 1])),
                color=colour, tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("key_span:N"),
                                       alt.Tooltip("mean(mass):Q", format=".1%")])
        .properties(width=width, height=220, title="by layer")
    )
    return alt.hconcat(by_step, by_layer).properties(
        title=title("Attention on each prompt span", "the share of each new token's attention that lands on "
                                                     "the span (the row that chose the token)"))
