"""Head categories from head scores (Clark et al. 2019, extended with Olsson et al. 2022).

A head gets exactly one category. Candidates are the "mass" categories, each decided by
one score of head_scores against its threshold:

===============  =====================================  ===================================
category         decided by                             default threshold (source)
===============  =====================================  ===================================
previous-token   previous_token >= 0.5                  Clark et al.: positional heads 0.5
next-token       next_token >= 0.5                      Clark et al.: positional heads 0.5
self             self >= 0.5                            same rule as the positional heads
sink             max(cls, first_token) >= 0.6           Clark et al.: special tokens 0.6
                 ([CLS] in BERT, position 0 in GPT-2)
sep              sep >= 0.6                             Clark et al.: special tokens 0.6
punctuation      punctuation >= 0.6                     Clark et al.: special tokens 0.6
induction        induction >= 0.4                       attnjax (Olsson et al. give no cut;
duplicate        duplicate >= 0.4                       0.4 keeps heads that put most of
                                                        their content mass there)
===============  =====================================  ===================================

If several mass categories pass, the one with the largest score / threshold wins (ties
in the table's order). Otherwise:

- broad:  normalized_entropy >= 0.78. Clark et al. call a head broad above 3.8 nats of
  entropy at their 128-token inputs; 3.8 / ln 128 = 0.78 makes the rule length-free
  (and window-aware: on a sliding-window layer the keys are counted inside the window,
  so uniform attention over the W visible keys is exactly 1);
- local:  mean_distance <= 2.5 tokens (attnjax): mass stays near the query without any
  single offset reaching 0.5;
- mixed:  none of the above.

NaN scores (a stats-only Trace, a model without [CLS], input without repeats) never
pass a threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Tuple, Union

import numpy as np
import pandas as pd

from attnjax.analysis._common import resolve_thresholds

CATEGORIES: Tuple[str, ...] = (
    "previous-token", "next-token", "self", "sink", "sep", "punctuation",
    "induction", "duplicate", "broad", "local", "mixed",
)


@dataclasses.dataclass(frozen=True)
class HeadThresholds:
    """Thresholds of classify_heads; defaults and their sources in the module docstring."""

    previous_token: float = 0.5
    next_token: float = 0.5
    self: float = 0.5
    sink: float = 0.6
    sep: float = 0.6
    punctuation: float = 0.6
    induction: float = 0.4
    duplicate: float = 0.4
    broad: float = 0.78          # normalized entropy, at least
    local: float = 2.5           # mean distance in tokens, at most


# (category, threshold field, score columns whose maximum decides it)
_MASS_RULES = (
    ("previous-token", "previous_token", ("previous_token",)),
    ("next-token", "next_token", ("next_token",)),
    ("self", "self", ("self",)),
    ("sink", "sink", ("cls", "first_token")),
    ("sep", "sep", ("sep",)),
    ("punctuation", "punctuation", ("punctuation",)),
    ("induction", "induction", ("induction",)),
    ("duplicate", "duplicate", ("duplicate",)),
)

ThresholdsLike = Union[HeadThresholds, Mapping[str, float], None]


def classify_heads(scores: pd.DataFrame, thresholds: ThresholdsLike = None) -> pd.DataFrame:
    """Add a category to every row of head_scores's output (a copy; the input is untouched).

    thresholds: a HeadThresholds, or a dict overriding some of its fields.

    Columns added:
      category (str, one of CATEGORIES), decided_by (str: the score column that decided it,
      "" for mixed), decision_score (float: that score's value, NaN for mixed),
      decision_threshold (float: the threshold it was compared with, NaN for mixed).
    """
    limits = resolve_thresholds(HeadThresholds, thresholds, "head")
    missing = sorted({"normalized_entropy", "mean_distance"} - set(scores.columns))
    if missing:
        raise ValueError(f"classify_heads needs head_scores's columns; {missing} are missing.")
    result = scores.copy()
    categories, decided_by, values, cuts = [], [], [], []
    for _, row in scores.iterrows():
        category, column, value, cut = _classify_row(row, limits)
        categories.append(category)
        decided_by.append(column)
        values.append(value)
        cuts.append(cut)
    result["category"] = pd.Series(categories, index=result.index, dtype=object)
    result["decided_by"] = pd.Series(decided_by, index=result.index, dtype=object)
    result["decision_score"] = np.asarray(values, np.float64)
    result["decision_threshold"] = np.asarray(cuts, np.float64)
    return result


def _classify_row(row: pd.Series, limits: HeadThresholds):
    best = None  # (ratio, category, column, value, threshold)
    for category, field, columns in _MASS_RULES:
        threshold = getattr(limits, field)
        available = [(row[c], c) for c in columns if c in row.index and np.isfinite(row[c])]
        if not available:
            continue
        value, column = max(available)
        if value >= threshold and (best is None or value / threshold > best[0]):
            best = (value / threshold, category, column, float(value), threshold)
    if best is not None:
        return best[1:]
    if np.isfinite(row["normalized_entropy"]) and row["normalized_entropy"] >= limits.broad:
        return "broad", "normalized_entropy", float(row["normalized_entropy"]), limits.broad
    if np.isfinite(row["mean_distance"]) and row["mean_distance"] <= limits.local:
        return "local", "mean_distance", float(row["mean_distance"]), limits.local
    return "mixed", "", float("nan"), float("nan")
