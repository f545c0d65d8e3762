"""A new text in a warm process: run's length buckets mean no new compilation, and
classify_heads (vectorised over rows) decides exactly as the per-row version did."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import attnjax
from attnjax.analysis import classify_heads, head_scores
from attnjax.analysis._common import resolve_thresholds
from attnjax.analysis.taxonomy import _MASS_RULES, HeadThresholds


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


# The per-row implementation of classify_heads before it was vectorised: the reference
# (with the chance-corrected thresholds of issue 10's length-aware taxonomy).
def reference_classify_heads(scores: pd.DataFrame, thresholds=None) -> pd.DataFrame:
    limits = resolve_thresholds(HeadThresholds, thresholds, "head")
    result = scores.copy()
    categories, decided_by, values, cuts = [], [], [], []
    for _, row in scores.iterrows():
        category, column, value, cut = _reference_row(row, limits)
        categories.append(category)
        decided_by.append(column)
        values.append(value)
        cuts.append(cut)
    result["category"] = pd.Series(categories, index=result.index, dtype=object)
    result["decided_by"] = pd.Series(decided_by, index=result.index, dtype=object)
    result["decision_score"] = np.asarray(values, np.float64)
    result["decision_threshold"] = np.asarray(cuts, np.float64)
    return result


# The chance column of each mass score (taxonomy.py: thresholds count mass above chance).
CHANCE = {"previous_token": "chance_key", "next_token": "chance_key", "self": "chance_key",
          "first_token": "chance_key", "cls": "chance_cls", "sep": "chance_sep",
          "punctuation": "chance_punctuation"}


def _cut(row: pd.Series, column: str, threshold: float) -> float:
    chance_column = CHANCE.get(column)
    if chance_column is None or chance_column not in row.index:
        return float(threshold)
    chance = 0.0 if not np.isfinite(row[chance_column]) else float(row[chance_column])
    return chance + threshold * (1.0 - chance)


def _reference_row(row: pd.Series, limits: HeadThresholds):
    best = None  # (ratio, category, column, value, threshold)
    for category, field, columns in _MASS_RULES:
        base = getattr(limits, field)
        available = [(row[c] / _cut(row, c, base), c) for c in columns if c in row.index and np.isfinite(row[c])]
        if not available:
            continue
        ratio, column = max(available)
        value, threshold = float(row[column]), _cut(row, column, base)
        if value >= threshold and (best is None or ratio > best[0]):
            best = (ratio, category, column, value, threshold)
    if best is not None:
        return best[1:]
    if np.isfinite(row["normalized_entropy"]) and row["normalized_entropy"] >= limits.broad:
        return "broad", "normalized_entropy", float(row["normalized_entropy"]), limits.broad
    local = float(limits.local)
    if "chance_distance" in row.index and np.isfinite(row["chance_distance"]):
        local = min(local, 0.5 * float(row["chance_distance"]))
    if np.isfinite(row["mean_distance"]) and row["mean_distance"] <= local:
        return "local", "mean_distance", float(row["mean_distance"]), local
    return "mixed", "", float("nan"), float("nan")


TEXTS = [
    "hi there",
    "She went home.",
    "The cat sat on the mat. The cat sat on the mat again, and the dog watched.",
    "Researchers study how attention heads in language models route information, "
    "token by token, from one position to another; some heads look back, others look ahead.",
]


@pytest.mark.parametrize("thresholds", [None, {"sink": 0.3, "broad": 0.5}, {"local": 6.0, "self": 0.1}])
def test_classify_heads_matches_the_per_row_version_on_minilm(minilm, thresholds):
    for text in TEXTS:
        scores = head_scores(attnjax.run(minilm, text))
        fast = classify_heads(scores, thresholds)
        slow = reference_classify_heads(scores, thresholds)
        pd.testing.assert_frame_equal(fast, slow)
        assert fast["category"].tolist() == slow["category"].tolist()


def test_classify_heads_matches_the_per_row_version_on_ties_nan_and_inf():
    rng = np.random.default_rng(0)
    columns = ["normalized_entropy", "mean_distance", "previous_token", "next_token", "self", "cls",
               "first_token", "sep", "punctuation", "induction", "duplicate"]
    grid = np.array([np.nan, np.inf, -np.inf, 0.0, 0.3, 0.4, 0.5, 0.6, 0.78, 0.9, 1.2, 2.5, 3.0])
    frame = pd.DataFrame({c: rng.choice(grid, 4000) for c in columns})
    frame.loc[:100, "first_token"] = frame.loc[:100, "cls"]  # tied sink columns
    frame["concentrated_on"] = "x"
    for thresholds in (None, {"previous_token": 0.6, "sink": 0.5}):
        pd.testing.assert_frame_equal(classify_heads(frame, thresholds), reference_classify_heads(frame, thresholds))
    # Without the optional columns (GPT-2-like frames lack nothing, but callers may drop some).
    thin = frame.drop(columns=["cls", "sep", "induction"])
    pd.testing.assert_frame_equal(classify_heads(thin), reference_classify_heads(thin))
    empty = frame.iloc[:0]
    pd.testing.assert_frame_equal(classify_heads(empty), reference_classify_heads(empty), check_dtype=False)


def test_a_new_length_in_the_same_bucket_compiles_nothing(minilm, caplog):
    import jax

    def analyse(text):
        trace = attnjax.run(minilm, text)
        return trace.seq_len, classify_heads(head_scores(trace))

    assert analyse("A first text to warm the bucket up.")[0] == 16
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.DEBUG):
            caplog.clear()
            seq_len, _ = analyse("Another, longer one.")  # a different real length, same bucket
    finally:
        jax.config.update("jax_log_compiles", previous)
    assert seq_len == 16
    compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert not compiled, compiled


def test_bucket_padding_leaves_the_analyses_unchanged(minilm):
    # The analyses count only real queries and keys (trace.mask): padding to the bucket
    # gives the scores and categories of the unpadded run, up to float32 rounding.
    for text in TEXTS:
        bucketed = attnjax.run(minilm, text)
        exact = attnjax.run(minilm, text, pad_to="exact")
        assert bucketed.seq_len >= exact.seq_len
        padded, plain = head_scores(bucketed), head_scores(exact)
        pd.testing.assert_frame_equal(padded, plain, rtol=1e-4, atol=1e-5)
        assert classify_heads(padded)["category"].tolist() == classify_heads(plain)["category"].tolist()


def test_pooled_captures_keep_the_exact_length_by_default(minilm):
    # Capture(pool=P) bins the padded length; bucket padding would leave fewer bins over
    # the real tokens, so the default does not pad a pooled capture.
    text = "Pooled maps bin the real tokens, not the padding after them, into eight blocks."
    pooled = attnjax.run(minilm, text, capture=attnjax.Capture(stats=True, pool=8))
    exact = attnjax.run(minilm, text, pad_to="exact")
    assert pooled.seq_len == exact.seq_len and bool(np.asarray(pooled.mask).all())
    assert attnjax.run(minilm, text, capture=attnjax.Capture(stats=True, pool=8), pad_to="bucket").seq_len == 32
