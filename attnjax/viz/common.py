"""Shared pieces of the chart builders: inline data, colour options, frame checks."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

from attnjax.viz.images import SCHEMES

SCALES = ("linear", "log", "quantile", "absolute")
LOG_FLOOR = 1e-4          # weights drawn on a log scale are clipped up to this
QUANTILE_COLOURS = 9      # colours of a quantile scale
SIGNIFICANT_DIGITS = 4    # digits kept for floats written into a spec
CANVAS_ABOVE_MARKS = 4096  # charts with more marks than this render on a canvas
# A head is "near-uniform" when every query row is within this total-variation distance
# of the uniform distribution over its visible keys (uniform_deviation): at most 10 % of
# any row's attention is placed differently from spreading it evenly.
NEAR_UNIFORM_TV = 0.1
# Pixels an axis label may reach past the axis ends before Vega hides it. With
# labelBound=True the first token's label ([CLS], often the most attended key) was
# hidden once cells were narrow: tilted at -60 degrees a key label starts left of the
# axis (a 12-character label, frames.LABEL_CHARS, at 9 px reaches about 30 px out), and
# a 9 px query label is taller than a 3 px cell.
KEY_LABEL_BOUND = 40
QUERY_LABEL_BOUND = 8
ZOOM_HINT = "scroll to zoom, drag to pan, double-click to reset; hover a cell for its tokens"


# Characters XML (so SVG) cannot hold, or that draw as nothing, shown visibly instead:
# C0 controls as Unicode control pictures (U+2400 + code; newline as a return arrow),
# DEL as U+2421, C1 controls as \\x escapes, lone surrogates and U+FFFE/U+FFFF as U+FFFD.
_VISIBLE = {code: chr(0x2400 + code) for code in range(0x20)}
_VISIBLE.update({0x0A: "\u21b5", 0x7F: "\u2421", 0xFFFE: "\ufffd", 0xFFFF: "\ufffd"})
_VISIBLE.update({code: f"\\x{code:02x}" for code in range(0x80, 0xA0)})
_VISIBLE.update({code: "\ufffd" for code in range(0xD800, 0xE000)})
# Characters that change the direction of the text around them or draw as nothing: token
# text is untrusted, and U+202E makes "hello \u202eevil" read "hello live". They are
# shown as a visible tag, e.g. "\u27e8U+202E\u27e9", never applied.
INVISIBLE = (
    [0x00AD, 0x061C, 0x180E, 0xFEFF]
    + list(range(0x200B, 0x2010))      # zero-width space/joiners, LRM, RLM
    + [0x2028, 0x2029]                 # line / paragraph separators (break a line, and JS strings)
    + list(range(0x202A, 0x202F))      # embeddings and overrides (LRE RLE PDF LRO RLO)
    + list(range(0x2060, 0x2065))      # word joiner, invisible operators
    + list(range(0x2066, 0x206A))      # isolates (LRI RLI FSI PDI)
)
_VISIBLE.update({code: f"\u27e8U+{code:04X}\u27e9" for code in INVISIBLE})


def visible_text(text: str) -> str:
    """``text`` with control characters, lone surrogates, non-characters and invisible or
    direction-changing characters (``INVISIBLE``) made visible.

    Token text can hold any of them (GPT-2's byte tokens decode to "\\x00", say);
    SVG cannot, and vl-convert aborts the process on them.
    """
    return str(text).translate(_VISIBLE)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown colour scheme {scheme!r}; choose one of {sorted(SCHEMES)}.")
    return scheme


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"Unknown colour scale {scale!r}; choose one of {SCALES}.")
    return scale


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str, made_by: str) -> None:
    """Raise a ValueError naming the columns ``frame`` lacks."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame (from {made_by}); got {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}. Build it with {made_by}.")
    if frame.empty:
        raise ValueError(f"{what} is empty: nothing to draw.")


def _round(value: float) -> Optional[float]:
    if not math.isfinite(value):
        return None
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _plain_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float)):
        return _round(value) if isinstance(value, float) else value
    return visible_text(value)


def records(frame: pd.DataFrame, columns: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Rows as JSON-ready dicts: floats to 4 significant digits, NaN/inf as null, text
    visible. The rows of ``json_rows``, which defines the conversion once."""
    return json.loads(json_rows(frame, columns))


def inline(frame_or_rows: Any, columns: Optional[Sequence[str]] = None) -> alt.InlineData:
    """Inline data that bypasses Altair's 5000-row limit (sizes are controlled here)."""
    if isinstance(frame_or_rows, pd.DataFrame):
        rows = records(frame_or_rows, columns)
    else:
        rows = [{k: _plain_value(v) if isinstance(v, str) else v for k, v in row.items()} for row in frame_or_rows]
    # The rows are plain JSON values made here; Altair's per-row schema validation at
    # construction would cost about 2 s for a 128-token heatmap (the whole spec is
    # still validated once by to_dict).
    with alt.utils.schemapi.debug_mode(False):
        return alt.InlineData(values=rows)


def json_rows(frame: Any, columns: Optional[Sequence[str]] = None) -> str:
    """A frame's rows as one compact JSON array, written column by column.

    Numbers are formatted once per column (floats to SIGNIFICANT_DIGITS, NaN/inf as
    null) and each row is one %-format of a template, about 5x faster than building row
    dicts for ``json.dumps`` (a 128-token heatmap's 16k cells: ~7 ms instead of ~35 ms).
    """
    frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(list(frame))
    frame = frame if columns is None else frame[list(columns)]
    texts = [_json_column(frame[column].to_numpy()) for column in frame.columns]
    keys = [json.dumps(str(column)).replace("%", "%%") for column in frame.columns]
    template = "{" + ",".join(f"{key}:%s" for key in keys) + "}"
    return "[" + ",".join(map(template.__mod__, zip(*texts))) + "]"


def _json_column(values: np.ndarray) -> List[str]:
    """One column's values as JSON texts: floats to SIGNIFICANT_DIGITS (NaN/inf: null), text visible."""
    if values.dtype.kind == "b":
        return ["true" if v else "false" for v in values.tolist()]
    if values.dtype.kind in "iu":
        return [str(v) for v in values.tolist()]
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        texts = [f"{v:.{SIGNIFICANT_DIGITS}g}" for v in values.tolist()]
        return texts if finite.all() else [t if ok else "null" for t, ok in zip(texts, finite.tolist())]
    return [json.dumps(_plain_value(v), allow_nan=False) for v in values]


def inline_json(frame: Any, columns: Optional[Sequence[str]] = None) -> alt.InlineData:
    """Inline data carried as one JSON string (Vega parses it: ``format: json``).

    For big tables (a heatmap's cells, the overview's grid): Altair deep-copies row
    dicts each time a chart is composed, copied or converted (~0.3 s for a MiniLM
    overview); a string is copied by reference. The rows are those of ``records`` (so
    text is made visible), written by ``json_rows``.
    """
    with alt.utils.schemapi.debug_mode(False):
        return alt.InlineData(values=json_rows(frame, columns), format={"type": "json"})


def colour_scale(scheme: str, scale: str, domain: Optional[Sequence[float]] = None) -> alt.Scale:
    """A colour scale: linear over ``domain`` (the weights present: pass their [min, max]
    so the legend's ends are the data's), log, quantile, or absolute (fixed [0, 1], so
    near-uniform weights look alike instead of spanning the whole palette)."""
    check_scheme(scheme)
    check_scale(scale)
    if scale == "absolute":
        return alt.Scale(scheme=scheme, domain=[0, 1], clamp=True, nice=False)
    extra: Dict[str, Any] = {} if domain is None else {"domain": [_round(float(v)) for v in domain], "nice": False}
    if scale == "linear":
        return alt.Scale(scheme=scheme, zero=False, **extra)
    if scale == "log":
        return alt.Scale(type="log", scheme=scheme, **extra)
    return alt.Scale(type="quantile", scheme=alt.SchemeParams(name=scheme, count=QUANTILE_COLOURS))


def weight_range(weights: np.ndarray, scale: str) -> Optional[List[float]]:
    """The colour domain for ``weights``: [min, max] (log: clipped at LOG_FLOOR); None for
    quantile and absolute scales, which fix their own."""
    weights = np.asarray(weights, dtype=np.float64)
    if scale in ("quantile", "absolute") or weights.size == 0:
        return None
    low, high = float(weights.min()), float(weights.max())
    if scale == "log":
        low, high = max(low, LOG_FLOOR), max(high, LOG_FLOOR)
    if high <= low:
        high = low + 1e-6
    return [low, high]


def colour_legend(scale: str, weights: np.ndarray, pooled: bool = False) -> alt.Legend:
    """A legend whose title states the actual range of the weights drawn, and for a linear
    or log scale puts its end labels at that range's ends."""
    weights = np.asarray(weights, dtype=np.float64)
    name = "block mean" if pooled else "weight"
    if weights.size == 0:
        return alt.Legend(title=name)
    low, high = float(weights.min()), float(weights.max())
    lines = [name, f"range {low:.3g}\u2013{high:.3g}"]
    if scale == "absolute":
        lines[1] += " of 0\u20131"
    domain = weight_range(weights, scale)
    if domain is None:
        return alt.Legend(title=lines)
    return alt.Legend(title=lines, values=[_round(v) for v in domain], format=".3~g")


def uniform_deviation(maps: np.ndarray) -> np.ndarray:
    """How far each map is from uniform attention: (..., Q, K) -> (...).

    For every query row, the total-variation distance 1/2 sum_k |w_k - 1/n| between the
    row (renormalised to sum 1) and the uniform distribution over its n visible keys;
    the map's value is the largest over its rows. Visible keys: all of them, or for a
    causal map (every weight above the diagonal exactly 0) keys <= the query. A head is
    near-uniform when this is <= NEAR_UNIFORM_TV. Rows with no weight count as 0; a map
    with no row of two or more visible keys gets NaN (uniformity means nothing there).
    """
    maps = np.asarray(maps, dtype=np.float64)                                # (..., Q, K)
    n_q, n_k = maps.shape[-2:]
    upper = np.triu(np.ones((n_q, n_k), dtype=bool), k=1)                      # (Q, K)
    causal = ~np.any(maps[..., upper] > 0, axis=-1)                           # (...,)
    visible = np.where(causal[..., None, None], ~upper, True)                  # (..., Q, K)
    count = visible.sum(axis=-1, keepdims=True)                               # (..., Q, 1)
    total = maps.sum(axis=-1, keepdims=True)                                  # (..., Q, 1)
    rows = np.divide(maps, total, out=np.zeros_like(maps), where=total > 0)   # (..., Q, K)
    distance = 0.5 * np.where(visible, np.abs(rows - 1.0 / count), 0.0).sum(axis=-1)  # (..., Q)
    distance = np.where(total[..., 0] > 0, distance, 0.0)
    result = distance.max(axis=-1)
    return np.where((count[..., 0] >= 2).any(axis=-1), result, np.nan)


def near_uniform_note(deviation: float) -> Optional[str]:
    """The chart line marking a near-uniform head, or None."""
    if not (np.isfinite(deviation) and deviation <= NEAR_UNIFORM_TV):
        return None
    return (f"\u2248 near-uniform head: every row is within {deviation:.3f} (total variation) of uniform "
            f"attention (threshold {NEAR_UNIFORM_TV}); colour differences here are noise-sized, "
            "compare scale='absolute'")


def colour_field(scale: str) -> str:
    """The field the colour encodes: the weight, or for a log scale the clipped weight."""
    return "weight_shown" if scale == "log" else "weight"


def colour_calculation(scale: str) -> Dict[str, str]:
    return {"weight_shown": f"max(datum.weight, {LOG_FLOOR})"} if scale == "log" else {}


def is_pooled(frame: pd.DataFrame) -> bool:
    return bool(frame.attrs.get("pooled")) if hasattr(frame, "attrs") else False


def pooled_note(frame: pd.DataFrame) -> Optional[str]:
    """The chart line saying a frame's maps are block means, or None (see block_means_note)."""
    return block_means_note(frame.attrs.get("pooled") if hasattr(frame, "attrs") else None)


def block_means_note(pooled: Optional[Mapping[str, int]]) -> Optional[str]:
    """The chart line for maps pooled as ``pooled`` ({"bins", "tokens"}), or None when not pooled."""
    if not pooled:
        return None
    return (f"Block means: {pooled['tokens']} tokens shown as a pooled {pooled['bins']} x {pooled['bins']} map; "
            "each cell is the mean weight over a block of queries x keys, not one weight.")


def title(text: str, subtitle: Optional[Sequence[str] | str] = None) -> alt.TitleParams:
    lines = [subtitle] if isinstance(subtitle, str) else [s for s in (subtitle or []) if s]
    if lines:
        return alt.TitleParams(text=text, subtitle=lines, anchor="start")
    return alt.TitleParams(text=text, anchor="start")


def renderer_hint(marks: int) -> Dict[str, Any]:
    """usermeta telling the exporter which Vega renderer suits this many marks."""
    return {"attnjax": {"renderer": "canvas" if marks > CANVAS_ABOVE_MARKS else "svg"}}


def label_param(name: str, labels: Mapping[int, str] | Sequence[str]) -> alt.Parameter:
    """A variable parameter holding axis labels by position, for ``labelExpr``."""
    if not isinstance(labels, Mapping):
        labels = dict(enumerate(labels))
    return alt.param(name=name, value={str(int(k)): visible_text(v) for k, v in labels.items()})


def with_params(chart, *params: alt.Parameter):
    """``chart`` with ``params`` appended in place: ``add_params`` deep-copies the whole
    chart and every parameter value (token labels: ~0.1-0.5 s for a MiniLM overview)."""
    existing = [] if chart.params is alt.Undefined else list(chart.params)
    chart.params = existing + [p.param for p in params]
    return chart


def label_expr(param_name: str) -> str:
    return f"{param_name}[datum.value] || ''"


def score_columns(frame: pd.DataFrame, exclude: Iterable[str] = ()) -> List[str]:
    """Numeric columns of a per-head frame, for tooltips."""
    skip = set(exclude) | {"layer", "head"}
    return [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])]
