"""AttentionViz's joint query/key picture (Yeh et al. 2023) of one head, or of every head
with a head selector: queries and keys in one 2-D embedding, so that a query lies near
the keys it scores highly.

Before the embedding, keys are translated so their mean equals the queries' mean (each
query's scores change by one constant, so its softmax does not), then queries are
scaled by c and keys by 1/c, c = sqrt(mean ||k|| / mean ||q||), so both sets have the
same mean norm and every dot product is kept (attnjax.viz.inside_frames.
attentionviz_normalise). The caption names the method.
"""

from __future__ import annotations

from typing import Optional

import altair as alt
import numpy as np

from attnjax.trace import Trace
from attnjax.viz.common import inline, renderer_hint, title
from attnjax.viz.inside_frames import check_head, qk_embedding_frames, require_qkv

SIZE = 420
KIND_COLOURS = alt.Scale(domain=["query", "key"], range=["#e45756", "#4c78a8"])
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}
LABEL_ALL_TOKENS = 24   # up to this many tokens every point is labelled; above, the hovered one


def qk_embedding(trace: Trace, layer: int, head: Optional[int] = None, *, sequence: int = 0,
                 method: str = "pca") -> alt.LayerChart:
    """Queries and keys of ``layer`` / ``head`` in one 2-D embedding (needs Capture(qkv=True)).

    head None: every head of the layer, one embedding each, with a head dropdown
    (``qk_head`` parameter). Points are coloured query / key, tokens on hover; a line
    joins each query to the key it attends to most. ``method``: "pca" (joint PCA of the
    normalised queries and keys: linear, so distances keep their meaning) or "tsne"
    (t-SNE, van der Maaten & Hinton 2008, as AttentionViz also offers: neighbourhoods
    kept, distances between groups not; about a second per head at 256 tokens).
    """
    require_qkv(trace, "qk_embedding")
    heads_total = int(trace.queries.shape[2])
    if head is not None:
        check_head(head, heads_total, "qk_embedding")
    heads = list(range(heads_total)) if head is None else [int(head)]
    points, pairs, info = qk_embedding_frames(trace, layer, heads, sequence=sequence, method=method)
    start = heads[0]
    options = {"bind": alt.binding_select(options=heads, name="head ")} if len(heads) > 1 else {}
    head_param = alt.param(name="qk_head", value=start, **options)
    hover = alt.selection_point(name="qk_hover", fields=["position"], on="pointerover", clear="pointerout",
                                empty=True)
    x = alt.X("x:Q", title=f"{METHOD_NAMES[method]} 1", axis=alt.Axis(labels=False, ticks=False))
    y = alt.Y("y:Q", title=f"{METHOD_NAMES[method]} 2", axis=alt.Axis(labels=False, ticks=False))
    lines = (
        alt.Chart(inline(pairs))
        .transform_filter("datum.head == qk_head")
        .mark_rule(color="#888")
        .encode(x=x, y=y, x2="x2:Q", y2="y2:Q",
                opacity=alt.Opacity("weight:Q", scale=alt.Scale(domain=[0, 1], range=[0.1, 0.8]), legend=None),
                tooltip=[alt.Tooltip("query:Q", title="query position"), alt.Tooltip("key:Q", title="key position"),
                         alt.Tooltip("weight:Q", format=".3f")])
    )
    dots = (
        alt.Chart(inline(points))
        .transform_filter("datum.head == qk_head")
        .mark_point(filled=True, size=70)
        .encode(
            x=x, y=y,
            color=alt.Color("kind:N", scale=KIND_COLOURS, title=None),
            shape=alt.Shape("kind:N", scale=alt.Scale(domain=["query", "key"], range=["circle", "square"]),
                            title=None),
            opacity=alt.condition(hover, alt.value(0.9), alt.value(0.15)),
            tooltip=[alt.Tooltip("kind:N"), alt.Tooltip("token:N"), alt.Tooltip("position:Q")],
        )
        .add_params(hover)
    )
    labels = (
        alt.Chart(inline(points))
        .transform_filter("datum.head == qk_head")
        .transform_filter({"param": "qk_hover", "empty": info["tokens"] <= LABEL_ALL_TOKENS})
        .mark_text(dx=6, align="left", fontSize=9)
        .encode(x=x, y=y, text="label:N", color=alt.Color("kind:N", scale=KIND_COLOURS, title=None))
    )
    if method == "pca":
        shares = ", ".join(f"{100 * float(np.sum(info['variance'][h])):.0f}%" for h in heads[:1])
        method_note = f"Axes 1-2 hold {shares} of the variance" + (" (first head)." if len(heads) > 1 else ".")
    else:
        method_note = (f"t-SNE (perplexity {info['perplexity']:.0f}) keeps each point's neighbours near it; "
                       "distances between groups and the axes mean nothing.")
    caption = [
        f"{METHOD_NAMES[method]} of queries and keys together, after AttentionViz's normalisation (Yeh et al. 2023): "
        "keys translated so their mean equals the queries' mean,",
        "then queries \u00d7 c and keys \u00f7 c with c = sqrt(mean|k| / mean|q|), so nearby means a high dot "
        "product. Lines: each query's most attended key.",
        method_note,
    ]
    heading = f"Queries and keys, layer {info['layer']}" + ("" if head is None else f" head {head}")
    return (
        alt.layer(lines, dots, labels)
        .add_params(head_param)
        .properties(width=SIZE, height=SIZE, title=title(heading, caption), usermeta=renderer_hint(len(points)))
    )
