"""The report's "Inside a head" and "Model structure" sections (attnjax.report appends them).

One head is opened: the head the overview starts on (``inside_head``: the most decisive
head of a specific category, else the most concentrated one). Its head view, the
step-by-step computation for the report's token (--token), its query/key map, and the
model's structure.

Size and time: the head view sends one layer's lines only; above
HEAD_VIEW_MAX_TOKENS tokens it draws each query's top keys (REPORT_TOP_K when the
overview is pooled), and the step view draws the STEPS_MAX_KEYS heaviest keys. With
no T x T maps ("statistics only", over FULL_ATTENTION_TOKENS tokens) the head view,
steps and Q/K map are left out with a note (Q/K maps of thousands of points would
outweigh the page); the model structure is always shown.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pandas as pd

from attnjax.viz.head_view import head_view
from attnjax.viz.html import Block
from attnjax.viz.inside_frames import HEAD_VIEW_MAX_TOKENS, STEPS_MAX_KEYS
from attnjax.viz.qk_map import qk_embedding
from attnjax.viz.steps import attention_steps
from attnjax.viz.structure import model_structure

GENERIC = ("mixed", "sink", "broad")   # categories that say little about one head
REPORT_TOP_K = 3                       # head-view lines per query when the overview is pooled


def inside_head(heads: pd.DataFrame) -> Tuple[int, int]:
    """(layer, head) to open: the most decisive head of a specific category
    (decision_score / decision_threshold), else the head with the highest max_weight."""
    specific = heads[~heads["category"].isin(GENERIC)] if "category" in heads.columns else heads.iloc[:0]
    if len(specific) and {"decision_score", "decision_threshold"} <= set(specific.columns):
        ratio = specific["decision_score"] / specific["decision_threshold"].replace(0, np.nan)
        best = specific.loc[ratio.fillna(0).idxmax()]
    else:
        best = heads.loc[heads["max_weight"].idxmax()] if "max_weight" in heads.columns else heads.iloc[0]
    return int(best["layer"]), int(best["head"])


def inside_blocks(r) -> List[Block]:
    """Blocks for the inside-a-head views of report Results ``r`` and the model structure."""
    blocks: List[Block] = [Block("h2", "Inside a head", anchor="inside")]
    trace = r.trace
    if trace.attention is None or trace.queries is None:
        blocks.append(Block("note", "Left out: the input is too long for full attention maps, and the head view, "
                                    "the step-by-step view and the query/key map need them."))
    else:
        layer, head = inside_head(r.heads)
        n = len(r.tokens)
        top_k = REPORT_TOP_K if r.mode != "full" else None
        token = r.tokens[list(r.positions).index(r.position)]
        thinned = []
        if n > HEAD_VIEW_MAX_TOKENS:
            thinned.append(f"the head view draws each query's top {top_k or 5} keys")
        if n > STEPS_MAX_KEYS:
            thinned.append(f"the step view draws the {STEPS_MAX_KEYS} heaviest keys")
        blocks += [
            Block("note", f"Layer {layer}, head {head} (the head the overview opens: its most decisive specific "
                          "head). Head view after Vig (2019): each query on the left joined to the keys it attends "
                          "to, line opacity = weight; point at a token to keep only its lines; the dropdown "
                          "switches heads or overlays them all."
                          + (f" Long input ({n} tokens): {'; '.join(thinned)}." if thinned else "")),
            Block("chart", head_view(trace, layer, head, top_k=top_k)),
            Block("note", f"How token {r.position} (\u201c{token}\u201d) attends in this head, step by step, "
                          "recomputed from the recorded queries, keys and values. Pick another token with --token."),
            Block("chart", attention_steps(trace, layer, head, r.position)),
            Block("chart", qk_embedding(trace, layer, head)),
        ]
    blocks += [
        Block("h2", "Model structure", anchor="structure"),
        Block("note", "The module tree from the parameters and the config (the model is not run): shapes, "
                      "parameter counts and FLOPs per token (2 x in x out per weight matrix, plus the attention's "
                      "q.k and weights.v), and the attention path of one block."),
        Block("chart", model_structure(r.model)),
    ]
    return blocks


def overview_start(heads: pd.DataFrame) -> Tuple[int, int]:
    """The head the overview opens on: the one the inside views show."""
    return inside_head(heads)
