"""Altair charts of attention analyses and safe self-contained HTML (the report page is built by attnjax.report).

    from attnjax import viz
    frame = viz.attention_frame(trace)            # long (layer, head, query, key, weight, tokens)
    viz.save_html(viz.model_overview(frame), "overview.html")
    viz.save_image(viz.attention_heatmap(frame, layer=2, head=5, scale="log"), "head.png")

Every chart builder is a function from DataFrame(s) to an Altair chart; the
DataFrames come from attnjax.analysis (or, for attention maps, from
``attention_frame``). See docs/viz.md for the charts and the size budget.
"""

from attnjax.viz.attention import attention_heatmap
from attnjax.viz.corpus import corpus_anomaly_chart, corpus_focus, spread_chart, stability_chart
from attnjax.viz.frames import (
    HEATMAP_MAX_TOKENS,
    OVERVIEW_MAX_WEIGHTS,
    attention_frame,
    next_token_frames,
    token_frame,
)
from attnjax.viz.generation import generation_frames, generation_view, span_mass_chart
from attnjax.viz.grids import anomaly_chart, comparison_chart, taxonomy_chart
from attnjax.viz.head_view import head_view
from attnjax.viz.html import save_html, save_image, to_html
from attnjax.viz.overview import model_overview
from attnjax.viz.qk_map import qk_embedding
from attnjax.viz.steps import attention_steps
from attnjax.viz.structure import model_structure
from attnjax.viz.lab import category_chart, induction_chart, loss_chart, training_charts
from attnjax.viz.layers import focus_chart, layer_similarity_chart, token_flow_chart
from attnjax.viz.next_token import next_token_explorer

__all__ = [
    "HEATMAP_MAX_TOKENS", "OVERVIEW_MAX_WEIGHTS", "anomaly_chart", "attention_frame",
    "attention_heatmap", "attention_steps", "comparison_chart", "focus_chart", "generation_frames",
    "generation_view", "head_view", "layer_similarity_chart", "model_overview", "model_structure",
    "next_token_explorer", "next_token_frames", "qk_embedding", "save_html", "save_image", "span_mass_chart",
    "taxonomy_chart", "to_html", "token_flow_chart", "token_frame",
    "category_chart", "induction_chart", "loss_chart", "training_charts",
    "corpus_anomaly_chart", "corpus_focus", "spread_chart", "stability_chart",
]

