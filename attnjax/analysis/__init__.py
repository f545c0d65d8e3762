"""attnjax.analysis: a Trace in, answers out as long-format pandas DataFrames.

Every function reads arrays from a Trace (full attention where captured, streaming
AttentionStats where that is all there is), computes with jnp under jit, and builds one
DataFrame at the end with explicit 0-based ``layer`` / ``head`` / ``query`` / ``key``
columns. No function modifies its input. Definitions, with the papers they follow, are
in each function's docstring and its module's.

Head scores and taxonomy   head_scores, classify_heads        (scores.py, taxonomy.py)
Cross-layer tracking       rollout, rollout_frame, attention_flow, token_flow,
                           focus_by_layer                     (flow.py)
Similarity                 layer_similarity, head_similarity  (similarity.py)
Anomalies                  detect_anomalies                   (anomalies.py)
Comparisons                compare                            (compare.py)
Prompt spans               span_attention, span_mass_by_step  (spans.py)

Rows that describe a whole layer, or the mean over heads, carry head = -1 (ALL_HEADS).
"""

from attnjax.analysis._common import ALL_HEADS, CLS_TOKENS, PUNCTUATION_TOKENS, SEP_TOKENS
from attnjax.analysis.anomalies import KINDS, VERDICTS, AnomalyThresholds, detect_anomalies
from attnjax.analysis.compare import compare
from attnjax.analysis.flow import attention_flow, focus_by_layer, rollout, rollout_frame, token_flow
from attnjax.analysis.scores import SCORE_COLUMNS, head_scores
from attnjax.analysis.similarity import METRICS, head_similarity, layer_similarity
from attnjax.analysis.spans import span_attention, span_mass_by_step
from attnjax.analysis.taxonomy import CATEGORIES, HeadThresholds, classify_heads

__all__ = [
    "ALL_HEADS", "CATEGORIES", "CLS_TOKENS", "KINDS", "METRICS", "PUNCTUATION_TOKENS", "VERDICTS",
    "SCORE_COLUMNS", "SEP_TOKENS", "AnomalyThresholds", "HeadThresholds",
    "attention_flow", "classify_heads", "compare", "detect_anomalies", "focus_by_layer",
    "head_scores", "head_similarity", "layer_similarity", "rollout", "rollout_frame",
    "span_attention", "span_mass_by_step", "token_flow",
]
