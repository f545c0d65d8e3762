"""Attention mass between spans of a prompt: does the answer read the system prompt?

A span is a half-open range of token positions (start, end), named by the caller
(``attnjax.spans_from_chat`` and ``attnjax.spans_from_text`` derive them from chat
roles and from marked characters). For layer l, head h, a query span Q and a key span
K, with A = trace.attention[l, sequence, h] (rows sum to 1 over each query's visible
keys):

    mass(l, h, Q, K) = (1 / |Q|) * sum_{i in Q} sum_{k in K} A[i, k]

the share of its attention that the average query of Q puts on K (0 when K lies after
Q: causal queries see no later key). Each layer also gets the mean over its heads,
with head = -1 (ALL_HEADS). This is the "attention to a segment" measure of Clark et
al. 2019 (What Does BERT Look At?, Sec. 3: attention to [SEP] and to the other
sentence), taken over named spans instead of fixed tokens.

Over a generation (``span_mass_by_step``) the queries are the rows that chose each new
token (row prompt_length - 1 + s for step s, see attnjax.generate), one at a time:
"the answer's attention on the system prompt fell from 30% to 4% after step ten".
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from attnjax.analysis._common import ALL_HEADS, as_single_trace, check_sequence, layer_ids, require_attention
from attnjax.trace import Trace

Span = Tuple[int, int]


def check_spans(spans, length: int, argument: str = "spans") -> Dict[str, Span]:
    """name -> (start, end) with 0 <= start < end <= length, or a clear error."""
    if not isinstance(spans, Mapping) or not spans:
        raise ValueError(f"{argument} must be a non-empty dict of name -> (start, end) token positions, e.g. "
                         "{'system': (0, 12), 'user': (12, 30)}; attnjax.spans_from_chat makes one.")
    checked = {}
    for name, span in spans.items():
        try:
            start, end = span
            if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (start, end)):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"{argument}[{name!r}] is {span!r}; give (start, end) token positions "
                             "(integers, end excluded).") from None
        if not 0 <= start < end <= length:
            raise ValueError(f"{argument}[{name!r}] = ({start}, {end}) is out of range: the sequence has {length} "
                             f"tokens, so a span needs 0 <= start < end <= {length}.")
        checked[str(name)] = (int(start), int(end))
    return checked


def _maps(trace: Trace, sequence: int, what: str) -> Tuple[np.ndarray, int]:
    as_single_trace(trace, what)
    require_attention(trace, what)
    check_sequence(trace, sequence)
    length = int(np.asarray(trace.mask, bool)[sequence].sum())
    attention = np.asarray(trace.attention[:, sequence], np.float64)[..., :length, :length]  # (L, H, T, T)
    return attention, length


def _frame(rows: Dict[str, list], masses: np.ndarray, layers: Sequence[int]) -> pd.DataFrame:
    """masses (L, H, ...) flattened with a head-mean per layer; rows: the trailing axes' labels."""
    num_layers, num_heads = masses.shape[:2]
    with_mean = np.concatenate([masses, masses.mean(axis=1, keepdims=True)], axis=1)  # (L, H + 1, ...)
    cells = int(np.prod(masses.shape[2:]))
    frame = pd.DataFrame({
        "layer": np.repeat(np.asarray(layers, int), (num_heads + 1) * cells),
        "head": np.tile(np.repeat(np.append(np.arange(num_heads), ALL_HEADS), cells), num_layers),
        **{name: np.tile(np.asarray(values, dtype=object if isinstance(values[0], str) else None),
                         num_layers * (num_heads + 1)) for name, values in rows.items()},
        "mass": with_mean.reshape(-1),
    })
    return frame


def span_attention(trace: Trace, spans: Mapping[str, Span], *, queries: Optional[Mapping[str, Span]] = None,
                   sequence: int = 0) -> pd.DataFrame:
    """Attention mass from each query span to each key span, per layer and head (module docstring).

    spans: name -> (start, end) token positions: the key spans, and the query spans
    too unless ``queries`` names other ones. sequence: which sequence of the Trace.
    Columns: layer, head (-1: the mean over heads), query_span, key_span, mass.
    """
    attention, length = _maps(trace, sequence, "span_attention")
    keys = check_spans(spans, length)
    query_spans = keys if queries is None else check_spans(queries, length, "queries")
    key_mass = np.stack([attention[..., a:b].sum(-1) for a, b in keys.values()], axis=-1)  # (L, H, T, K)
    masses = np.stack([key_mass[:, :, a:b].mean(axis=2) for a, b in query_spans.values()], axis=2)  # (L, H, Q, K)
    labels = {
        "query_span": [q for q in query_spans for _ in keys],
        "key_span": [k for _ in query_spans for k in keys],
    }
    return _frame(labels, masses, layer_ids(trace))


def span_mass_by_step(trace: Trace, spans: Mapping[str, Span], *, prompt_length: int,
                      sequence: int = 0) -> pd.DataFrame:
    """Each new token's attention mass on each span, step by step, over a generation's Trace.

    Step s is the row that chose new token s, query position prompt_length - 1 + s,
    for every generated token (the trace's last row chose nothing that was kept).
    Columns: step, query, token (the new token chosen, when the Trace has tokens),
    layer, head (-1: the mean over heads), key_span, mass.
    """
    attention, length = _maps(trace, sequence, "span_mass_by_step")
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) \
            or not 1 <= prompt_length < length:
        raise ValueError(f"prompt_length={prompt_length!r}; the Trace has {length} tokens, so the prompt is "
                         f"1..{length - 1} of them (Generation.prompt_length).")
    keys = check_spans(spans, length)
    rows = np.arange(prompt_length - 1, length - 1)  # (S,) the choosing rows
    masses = np.stack([attention[:, :, rows, a:b].sum(-1) for a, b in keys.values()], axis=-1)  # (L, H, S, K)
    tokens = trace.tokens[sequence] if trace.tokens is not None else None
    steps = np.arange(len(rows))
    labels = {
        "step": [s for s in steps for _ in keys],
        "query": [int(r) for r in rows for _ in keys],
        "key_span": [k for _ in steps for k in keys],
    }
    frame = _frame(labels, masses, layer_ids(trace))
    if tokens is not None:
        chosen = {int(r): tokens[int(r) + 1] for r in rows}
        frame.insert(frame.columns.get_loc("query") + 1, "token", frame["query"].map(chosen))
    order = ["step", "query"] + (["token"] if tokens is not None else []) + ["layer", "head", "key_span", "mass"]
    return frame[order]
