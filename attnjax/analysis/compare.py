"""What changed between two Traces of the same model shape.

Two uses: two inputs through one model (what a perturbation of the text changes), or
one input through two checkpoints of the same architecture (what fine-tuning,
quantisation or another training step changed).

Alignment. The per-head scores (entropy, previous-token mass, ...) are each Trace's own
means over its own queries, so they compare whatever the two inputs are. The maps are
compared position by position (JS divergence row by row) only when that pairs up the
same places in the two inputs: every sequence has the same number of real tokens in
both (the same tokens, or the same length with some tokens substituted, as in "She
went home." -> "He went home.", where position i of one text stands for position i of
the other). With different lengths no position pairing is clear: the tokens after an
insertion shift, and in a bidirectional model even a shared prefix attends to different
later keys, so a prefix's maps are not comparable either. Then ``jsd`` is NaN and only
the scores are compared. ``frame.attrs["alignment"]`` says which, in words.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attnjax.analysis._common import as_single_trace, has_attention, layer_ids, validate_attention
from attnjax.analysis.scores import SCORE_COLUMNS, head_scores
from attnjax.analysis.similarity import _pair_stat
from attnjax.analysis.taxonomy import classify_heads
from attnjax.trace import Trace


@jax.jit
def _map_divergence(attention_a, attention_b, mask_a, mask_b):
    """(L, H) mean JS divergence over queries that are non-padding in both Traces."""
    divergence = _pair_stat(attention_a.astype(jnp.float32), attention_b.astype(jnp.float32), "jsd")  # (L, B, H, T)
    both = (mask_a & mask_b).astype(jnp.float32)  # (B, T)
    return jnp.einsum("LBHQ,BQ->LH", divergence, both) / jnp.maximum(both.sum(), 1.0)


def _padded(trace: Trace, seq: int):
    extra = seq - trace.seq_len
    mask = jnp.pad(trace.mask.astype(bool), ((0, 0), (0, extra)))
    attention = jnp.pad(trace.attention, ((0, 0),) * 3 + ((0, extra), (0, extra)))
    return attention, mask


def compare(trace_a: Trace, trace_b: Trace, thresholds=None) -> pd.DataFrame:
    """Per-head differences between two Traces with the same layers and heads.

    thresholds: passed to classify_heads for both sides.

    One row per (layer, head). Columns: layer (int), head (int); for every score s of
    head_scores (entropy, normalized_entropy, ..., duplicate): s_a, s_b (float) and
    s_diff (float, s_b - s_a); jsd (float: JS divergence in nats between the two
    attention maps, row by row over queries that are non-padding in both, averaged;
    positions are aligned by index, so it needs the same number of sequences, and
    NaN when either Trace holds only stats, or when the sequences' lengths differ: see
    the module docstring); category_a, category_b (str) and category_changed (bool).

    ``frame.attrs``: "alignment" ("positions" or "scores only"), "alignment_note" (the
    same in words, for a page), "differing_positions" (positions whose tokens differ
    when aligned by position and both Traces carry tokens; [] when the tokens match).
    """
    as_single_trace(trace_a, "compare")
    as_single_trace(trace_b, "compare")
    if layer_ids(trace_a) != layer_ids(trace_b) or trace_a.num_heads != trace_b.num_heads:
        raise ValueError(
            f"compare needs Traces of the same shape: trace_a holds layers {layer_ids(trace_a)} x "
            f"{trace_a.num_heads} heads, trace_b layers {layer_ids(trace_b)} x {trace_b.num_heads} heads."
        )
    scores_a = classify_heads(head_scores(trace_a), thresholds)
    scores_b = classify_heads(head_scores(trace_b), thresholds)
    frame = pd.DataFrame({"layer": scores_a["layer"].to_numpy(), "head": scores_a["head"].to_numpy()})
    for name in SCORE_COLUMNS:
        frame[f"{name}_a"] = scores_a[name].to_numpy()
        frame[f"{name}_b"] = scores_b[name].to_numpy()
        frame[f"{name}_diff"] = scores_b[name].to_numpy() - scores_a[name].to_numpy()
    aligned = _same_lengths(trace_a, trace_b)
    if aligned:
        frame["jsd"] = _divergence(trace_a, trace_b).reshape(-1)
    else:
        frame["jsd"] = np.nan
    frame["category_a"] = scores_a["category"].to_numpy()
    frame["category_b"] = scores_b["category"].to_numpy()
    frame["category_changed"] = frame["category_a"] != frame["category_b"]
    frame.attrs.update(_alignment(trace_a, trace_b, aligned))
    return frame


def _lengths(trace: Trace) -> np.ndarray:
    return np.asarray(trace.mask, bool).sum(-1)


def _same_lengths(trace_a: Trace, trace_b: Trace) -> bool:
    return trace_a.batch_size == trace_b.batch_size and bool(np.all(_lengths(trace_a) == _lengths(trace_b)))


def _alignment(trace_a: Trace, trace_b: Trace, aligned: bool) -> dict:
    """frame.attrs of compare: how the two Traces were paired, in words."""
    if not aligned:
        lengths = f"{_lengths(trace_a).tolist()} and {_lengths(trace_b).tolist()} tokens"
        return {"alignment": "scores only", "differing_positions": [],
                "alignment_note": f"The inputs have different lengths ({lengths}), so no position of one "
                                  "stands for a position of the other: only per-head summary scores (each "
                                  "input's own mean over its queries) are compared, not the maps (jsd is NaN)."}
    differing = []
    if trace_a.tokens is not None and trace_b.tokens is not None:
        mask = np.asarray(trace_a.mask, bool)
        for b in range(trace_a.batch_size):
            differing += [int(i) for i in np.flatnonzero(mask[b])
                          if trace_a.tokens[b][i] != trace_b.tokens[b][i] and int(i) not in differing]
    if not differing:
        note = "Same tokens in both: the maps are compared position by position (jsd)."
    else:
        note = (f"Same length, tokens differ at position(s) {', '.join(map(str, differing))}: the maps are "
                "compared position by position (jsd), each position standing for the same place in both.")
    return {"alignment": "positions", "differing_positions": differing, "alignment_note": note}


def _divergence(trace_a: Trace, trace_b: Trace) -> np.ndarray:
    shape = (len(layer_ids(trace_a)), trace_a.num_heads)
    if not (has_attention(trace_a) and has_attention(trace_b)):
        return np.full(shape, np.nan)
    if trace_a.batch_size != trace_b.batch_size:
        raise ValueError(
            f"compare aligns sequences by index: trace_a holds {trace_a.batch_size} sequences and "
            f"trace_b {trace_b.batch_size}."
        )
    validate_attention(trace_a)
    validate_attention(trace_b)
    seq = max(trace_a.seq_len, trace_b.seq_len)
    attention_a, mask_a = _padded(trace_a, seq)
    attention_b, mask_b = _padded(trace_b, seq)
    return np.asarray(_map_divergence(attention_a, attention_b, mask_a, mask_b), np.float64)
