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

Length: each mass threshold t is a share of the mass *above chance*. With c the mass
uniform attention would put on the score's keys (head_scores's chance columns: 1 / visible
keys for previous-token, next-token, self and position 0; visible [CLS] / [SEP] /
punctuation keys / visible keys for those), a head passes when its score is at least
c + t (1 - c). At Clark et al.'s 128 tokens c = 1/128 and the cut is 0.504 instead of
0.5; on "She went home." (6 tokens) it is 0.58, so a short text's chance mass is not read
as a pattern. induction / duplicate are not corrected (their keys exist only where tokens
repeat). Without the chance columns (a frame from elsewhere) t is used as is.

If several mass categories pass, the one with the largest score / threshold wins (ties
in the table's order). Otherwise:

- broad:  normalized_entropy >= 0.78. Clark et al. call a head broad above 3.8 nats of
  entropy at their 128-token inputs; 3.8 / ln 128 = 0.78 makes the rule length-free
  (and window-aware: on a sliding-window layer the keys are counted inside the window,
  so uniform attention over the W visible keys is exactly 1);
- local:  mean_distance <= 2.5 tokens (attnjax): mass stays near the query without any
  single offset reaching 0.5; and at most half of chance_distance (the mean |i - k| of
  uniform attention: 42.7 at 128 tokens, so the rule is unchanged there; 1.9 at 6
  tokens, where 2.5 would call uniform attention local);
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
# The chance mass (head_scores's chance columns) of each score column a rule reads.
_CHANCE = {
    "previous_token": "chance_key", "next_token": "chance_key", "self": "chance_key",
    "first_token": "chance_key", "cls": "chance_cls", "sep": "chance_sep",
    "punctuation": "chance_punctuation",
}

ThresholdsLike = Union[HeadThresholds, Mapping[str, float], None]


def classify_heads(scores: pd.DataFrame, thresholds: ThresholdsLike = None) -> pd.DataFrame:
    """Add a category to every row of head_scores's output (a copy; the input is untouched).

    thresholds: a HeadThresholds, or a dict overriding some of its fields.

    Columns added:
      category (str, one of CATEGORIES), decided_by (str: the score column that decided it,
      "" for mixed), decision_score (float: that score's value, NaN for mixed),
      decision_threshold (float: the threshold it was compared with, after the chance
      correction of the module docstring; NaN for mixed).
    """
    limits = resolve_thresholds(HeadThresholds, thresholds, "head")
    missing = sorted({"normalized_entropy", "mean_distance"} - set(scores.columns))
    if missing:
        raise ValueError(f"classify_heads needs head_scores's columns; {missing} are missing.")
    result = scores.copy()
    category, column, value, cut = _classify_rows(scores, limits)
    result["category"] = pd.Series(category, index=result.index, dtype=object)
    result["decided_by"] = pd.Series(column, index=result.index, dtype=object)
    result["decision_score"] = value
    result["decision_threshold"] = cut
    return result


def _classify_rows(scores: pd.DataFrame, limits: HeadThresholds):
    """(category, decided_by, decision_score, decision_threshold) arrays, one entry per row,
    vectorised over rows: the rules are visited in the table's order, and a passing rule
    replaces the best so far only with a strictly larger score / threshold."""
    rows = len(scores)
    category = np.full(rows, "mixed", dtype=object)
    column = np.full(rows, "", dtype=object)
    value = np.full(rows, np.nan)
    cut = np.full(rows, np.nan)
    best_ratio = np.full(rows, np.nan)
    decided = np.zeros(rows, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, field, columns in _MASS_RULES:
            base = getattr(limits, field)
            # The column with the largest finite score / threshold among the rule's columns
            # (ties: the later name in sorted order).
            rule_value = np.full(rows, np.nan)
            rule_cut = np.full(rows, np.nan)
            rule_column = np.full(rows, "", dtype=object)
            for candidate in sorted(c for c in columns if c in scores.columns):
                values = scores[candidate].to_numpy(np.float64)
                threshold = _chance_corrected(scores, candidate, base, rows)  # (rows,)
                take = np.isfinite(values) & ~(rule_value / rule_cut > values / threshold)  # NaN so far, or >=
                rule_value = np.where(take, values, rule_value)
                rule_cut = np.where(take, threshold, rule_cut)
                rule_column[take] = candidate
            ratio = rule_value / rule_cut
            update = (rule_value >= rule_cut) & (~decided | (ratio > best_ratio))
            category[update] = name
            column[update] = rule_column[update]
            value[update] = rule_value[update]
            cut[update] = rule_cut[update]
            best_ratio[update] = ratio[update]
            decided |= update
        entropy = scores["normalized_entropy"].to_numpy(np.float64)
        broad = ~decided & np.isfinite(entropy) & (entropy >= limits.broad)
        distance = scores["mean_distance"].to_numpy(np.float64)
        local_cut = np.full(rows, float(limits.local))
        if "chance_distance" in scores.columns:
            half = 0.5 * scores["chance_distance"].to_numpy(np.float64)
            local_cut = np.where(np.isfinite(half), np.minimum(local_cut, half), local_cut)
        local = ~decided & ~broad & np.isfinite(distance) & (distance <= local_cut)
    for mask, name, source, values, threshold in (
            (broad, "broad", "normalized_entropy", entropy, np.full(rows, float(limits.broad))),
            (local, "local", "mean_distance", distance, local_cut)):
        category[mask] = name
        column[mask] = source
        value[mask] = values[mask]
        cut[mask] = threshold[mask]
    return category, column, value, cut


def _chance_corrected(scores: pd.DataFrame, column: str, threshold: float, rows: int) -> np.ndarray:
    """(rows,) c + t (1 - c): the threshold t as a share of the mass above chance c (module
    docstring); t itself where the frame has no chance column for ``column``."""
    chance_column = _CHANCE.get(column)
    if chance_column is None or chance_column not in scores.columns:
        return np.full(rows, float(threshold))
    chance = np.nan_to_num(scores[chance_column].to_numpy(np.float64), nan=0.0)
    return chance + threshold * (1.0 - chance)
