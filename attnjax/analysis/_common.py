"""What every analysis shares: reading a Trace, checking it, and naming its axes.

Shapes (as in attnjax.trace): L recorded layers, B sequences, H heads, T positions.
Analyses see a Trace through three helpers:

- ``as_traces``      one Trace or a sequence of Traces (a corpus) -> a checked list;
- ``require_attention`` / ``has_attention``  whether full (L, B, H, T, T) maps exist;
- ``validate_attention``  rows sum to 1 over visible keys, nothing on invisible keys;
- ``trace_windows``       each recorded layer's sliding window (None: full attention).

Nothing here modifies a Trace: jax arrays are immutable, and token tuples are read only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from attnjax.analysis._terms import Windows, attention_row_checks, layer_windows
from attnjax.trace import Trace

TraceOrTraces = Union[Trace, Sequence[Trace]]

# Token strings that mark a model's special tokens. BERT-style ([CLS]/[SEP]) and
# RoBERTa-style (<s>/</s>) vocabularies. Causal Traces (GPT-2, the Llama-like decoders)
# have no [CLS]/[SEP] whatever their tokens (Llama's BOS is "<s>"): their cls/sep are
# NaN, and their sink is position 0 / BOS (first_token).
CLS_TOKENS: Tuple[str, ...] = ("[CLS]", "<s>")
SEP_TOKENS: Tuple[str, ...] = ("[SEP]", "</s>")
# Clark et al. 2019 count attention to "." and "," as attention to punctuation.
PUNCTUATION_TOKENS: Tuple[str, ...] = (".", ",")
# Word-start markers some tokenizers prefix to a token (GPT-2 byte BPE "Ġ",
# SentencePiece "▁"); stripped before comparing with PUNCTUATION_TOKENS.
WORD_START_MARKERS = ("Ġ", "▁")

# Rows must sum to 1 within this tolerance, scaled for low-precision maps
# (bfloat16 has 8 mantissa bits: one rounding of a row sum is ~4e-3).
ROW_SUM_ATOL = {np.dtype("float64"): 1e-6, np.dtype("float32"): 1e-3}
LOW_PRECISION_ROW_SUM_ATOL = 2e-2

# Index used in the `head` column for rows that describe a whole layer or the
# mean over heads rather than one head.
ALL_HEADS = -1


def as_single_trace(trace, function: str) -> Trace:
    """``trace`` checked as one Trace: functions that follow one sequence take no corpus."""
    if not isinstance(trace, Trace):
        raise TypeError(
            f"{function} takes one Trace (got {type(trace).__name__}); for several, call it "
            "once per Trace. head_scores, layer_similarity, head_similarity, focus_by_layer and "
            "detect_anomalies take a list of Traces as a corpus."
        )
    check_trace(trace)
    return trace


def as_traces(trace: TraceOrTraces) -> list:
    """One Trace or a sequence of them -> a non-empty list with compatible shapes."""
    traces = [trace] if isinstance(trace, Trace) else list(trace)
    if not traces:
        raise ValueError("Got an empty list of Traces; pass at least one Trace from attnjax.run.")
    for index, item in enumerate(traces):
        if not isinstance(item, Trace):
            raise TypeError(
                f"Expected an attnjax Trace (or a list of them), got {type(item).__name__} "
                f"at position {index}."
            )
        check_trace(item)
    first = traces[0]
    for index, item in enumerate(traces[1:], start=1):
        if layer_ids(item) != layer_ids(first) or item.num_heads != first.num_heads:
            raise ValueError(
                f"Trace {index} holds layers {layer_ids(item)} x {item.num_heads} heads, but "
                f"trace 0 holds layers {layer_ids(first)} x {first.num_heads} heads; a corpus "
                "must come from one model with one Capture."
            )
        if trace_windows(item) != trace_windows(first):
            raise ValueError(
                f"Trace {index} has sliding windows {trace_windows(item)} per layer, but trace 0 has "
                f"{trace_windows(first)}; a corpus must come from one model with one Capture."
            )
        if has_attention(item) != has_attention(first):
            raise ValueError(
                f"Trace {index} {'has' if has_attention(item) else 'lacks'} full attention but "
                f"trace 0 {'has' if has_attention(first) else 'lacks'} it; capture the same "
                "things for every Trace of a corpus."
            )
    return traces


def check_trace(trace: Trace) -> None:
    """Shapes agree and the batch is not empty; raises ValueError naming the problem."""
    if trace.mask is None or np.ndim(trace.mask) != 2:
        raise ValueError("Trace.mask must be a (batch, seq) boolean array.")
    batch, seq = trace.mask.shape
    if batch == 0 or seq == 0:
        raise ValueError(
            f"The Trace holds an empty batch (mask shape {tuple(trace.mask.shape)}); "
            "run the model on at least one non-empty text."
        )
    if trace.attention is None and trace.stats is None:
        raise ValueError(
            "This Trace holds neither attention nor stats; run with "
            "Capture(attention=True) or Capture(stats=True)."
        )
    if trace.attention is not None:
        shape = tuple(trace.attention.shape)
        if len(shape) != 5 or shape[1] != batch or shape[3] != seq or shape[4] != seq:
            raise ValueError(
                f"Trace.attention has shape {shape}; expected (layers, {batch}, heads, {seq}, {seq}) "
                f"to match mask {tuple(trace.mask.shape)}."
            )
        num_layers = shape[0]
    else:
        shape = tuple(trace.stats.entropy.shape)
        if len(shape) != 4 or shape[1] != batch or shape[3] != seq:
            raise ValueError(
                f"Trace.stats.entropy has shape {shape}; expected (layers, {batch}, heads, {seq})."
            )
        num_layers = shape[0]
    if num_layers == 0:
        raise ValueError("The Trace recorded no layers; Capture(layers=...) must name at least one.")
    if trace.layers and len(trace.layers) != num_layers:
        raise ValueError(
            f"Trace.layers = {trace.layers} names {len(trace.layers)} layers but the arrays hold "
            f"{num_layers}."
        )
    if trace.windows:
        if len(trace.windows) != num_layers:
            raise ValueError(
                f"Trace.windows = {trace.windows} names {len(trace.windows)} layers but the arrays hold "
                f"{num_layers}; give one window (None or W) per recorded layer, or () for none."
            )
        bad = [w for w in trace.windows if w is not None and (isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1)]
        if bad:
            raise ValueError(f"Trace.windows = {trace.windows} holds {bad[0]!r}; each entry must be None or a positive int.")
        if not trace.causal and any(w is not None for w in trace.windows):
            raise ValueError(
                f"Trace.windows = {trace.windows} sets a sliding window on a non-causal Trace; a window "
                "(query i sees keys i - W < k <= i) needs Trace.causal=True."
            )
    if not bool(np.any(np.asarray(trace.mask))):
        raise ValueError("Every position of the Trace is padding (mask all False); nothing to analyse.")


def num_layers(trace: Trace) -> int:
    array = trace.attention if trace.attention is not None else trace.stats.entropy
    return int(array.shape[0])


def layer_ids(trace: Trace) -> Tuple[int, ...]:
    """The model layer index of each entry of the L axis (0-based)."""
    return tuple(trace.layers) if trace.layers else tuple(range(num_layers(trace)))


def trace_windows(trace: Trace) -> Windows:
    """The sliding window of each entry of the L axis: None (full attention) or W."""
    return layer_windows(trace.windows, num_layers(trace))


def layer_position(trace: Trace, layer: int) -> int:
    """Position on the L axis of model layer ``layer``; ValueError if not recorded."""
    ids = layer_ids(trace)
    if layer not in ids:
        raise ValueError(f"Layer {layer} is not in this Trace; it recorded layers {ids}.")
    return ids.index(layer)


def check_head(trace: Trace, head: int) -> None:
    if not 0 <= head < trace.num_heads:
        raise ValueError(f"Head {head} is out of range; the model has heads 0..{trace.num_heads - 1}.")


def check_sequence(trace: Trace, sequence: int) -> None:
    if not 0 <= sequence < trace.batch_size:
        raise ValueError(
            f"Sequence {sequence} is out of range; the Trace holds sequences 0..{trace.batch_size - 1}."
        )


def has_attention(trace: Trace) -> bool:
    return trace.attention is not None


def require_attention(trace: Trace, what: str) -> None:
    if trace.attention is None:
        raise ValueError(
            f"{what} needs the full attention maps, but this Trace holds only streaming stats; "
            "run with Capture(attention=True) (short inputs) to use it."
        )


def token_strings(trace: Trace) -> Optional[np.ndarray]:
    """(B, T) object array of token strings, or None when the Trace carries none."""
    if trace.tokens is None:
        return None
    batch, seq = trace.mask.shape
    if len(trace.tokens) != batch or any(len(row) != seq for row in trace.tokens):
        raise ValueError(
            f"Trace.tokens must hold {batch} sequences of {seq} strings (padded like the mask)."
        )
    return np.array(trace.tokens, dtype=object).reshape(batch, seq)


def token_classes(
    trace: Trace,
    cls_tokens: Sequence[str] = CLS_TOKENS,
    sep_tokens: Sequence[str] = SEP_TOKENS,
    punctuation: Sequence[str] = PUNCTUATION_TOKENS,
) -> Tuple[np.ndarray, np.ndarray]:
    """Which keys are [CLS]-like, [SEP]-like and punctuation.

    Returns (classes (B, T, 3) float32 with channels cls, sep, punctuation;
    present (3,) bool: whether the class occurs at any non-padding position).
    Without tokens on the Trace every class is absent; a causal Trace (a decoder) has
    no [CLS]/[SEP] keys: a decoder's BOS "<s>" is its position-0 sink, and "</s>" ends
    a document rather than separating segments.
    """
    batch, seq = trace.mask.shape
    tokens = token_strings(trace)
    classes = np.zeros((batch, seq, 3), np.float32)  # (B, T, 3)
    if tokens is None:
        return classes, np.zeros(3, bool)
    stripped = np.vectorize(_strip_word_start, otypes=[object])(tokens)  # (B, T)
    if not trace.causal:
        classes[..., 0] = np.isin(tokens, list(cls_tokens))
        classes[..., 1] = np.isin(tokens, list(sep_tokens))
    classes[..., 2] = np.isin(stripped, list(punctuation))
    classes *= np.asarray(trace.mask, bool)[..., None]
    present = classes.reshape(-1, 3).any(axis=0)
    return classes, present


def _strip_word_start(token: str) -> str:
    for marker in WORD_START_MARKERS:
        if token.startswith(marker) and len(token) > len(marker):
            return token[len(marker):]
    return token


def row_sum_atol(dtype) -> float:
    return ROW_SUM_ATOL.get(np.dtype(dtype), LOW_PRECISION_ROW_SUM_ATOL)


def validate_attention(trace: Trace, checks: Optional[dict] = None) -> None:
    """Raise ValueError unless every non-padding query row is a distribution over visible keys
    (non-padding; earlier for causal Traces; within the layer's sliding window, if any).

    checks: row_sum, hidden (L, B, H, T) and lowest (B,) from _terms (computed if None,
    passed in where another pass over the maps already produced them).
    """
    if checks is None:
        checks = attention_row_checks(trace.attention, trace.mask, causal=trace.causal,
                                      windows=trace_windows(trace))
    checks = jax.device_get({name: checks[name] for name in ("row_sum", "hidden", "lowest")})
    query = np.asarray(trace.mask, bool)[None, :, None, :]  # (1, B, 1, T)
    row_sum = np.where(query, np.asarray(checks["row_sum"], np.float64), 1.0)  # (L, B, H, T)
    atol = row_sum_atol(trace.attention.dtype)
    if not np.all(np.isfinite(row_sum)):
        raise ValueError("Trace.attention holds NaN or inf at non-padding queries; the forward pass diverged.")
    lowest = float(np.min(checks["lowest"]))
    if lowest < -atol:
        raise ValueError(
            f"Trace.attention has a negative weight ({lowest:.3g}); attention must be softmax "
            "probabilities, not scores."
        )
    row_error = np.abs(row_sum - 1.0)
    if row_error.max() > atol:
        layer, sequence, head, query_index = np.unravel_index(int(row_error.argmax()), row_error.shape)
        raise ValueError(
            f"Trace.attention rows must sum to 1 over the keys (tolerance {atol:g}); the row of "
            f"layer {layer_ids(trace)[layer]}, head {head}, sequence {sequence}, query {query_index} "
            f"is off by {row_error.max():.3g}. Pass softmax probabilities (not scores or a "
            "renormalised subset)."
        )
    hidden = float(np.where(query, np.asarray(checks["hidden"], np.float64), 0.0).max())
    if hidden > atol:
        what = "padding or future keys" if trace.causal else "padding keys"
        check = "Trace.mask matches the forward's mask and Trace.causal the model"
        if any(window is not None for window in trace_windows(trace)):
            what = "padding, future or out-of-window keys"
            check += f" (and Trace.windows = {trace.windows} its sliding windows)"
        raise ValueError(
            f"Trace.attention puts weight {hidden:.3g} on {what}; attention must be 0 on keys the "
            f"mask hides. Check that {check}."
        )


def resolve_thresholds(cls, thresholds: Union[Any, Mapping[str, float], None], what: str):
    """A thresholds dataclass ``cls`` from None (the defaults), an instance, or a mapping
    of some of its fields to values (the rest default, each value takes its default's
    type); unknown names are an error."""
    if thresholds is None:
        return cls()
    if isinstance(thresholds, cls):
        return thresholds
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(thresholds) - fields)
    if unknown:
        raise ValueError(f"Unknown {what} thresholds {unknown}; valid names are {sorted(fields)}.")
    defaults = cls()
    return cls(**{name: type(getattr(defaults, name))(value) for name, value in thresholds.items()})
