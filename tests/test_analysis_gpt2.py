"""attnjax.analysis on a causal model: a tiny random GPT-2 through attnjax.run."""

from __future__ import annotations

import numpy as np
import pytest

import attnjax
from attnjax import analysis
from test_analysis_reference import SCORES, reference_head_scores

from tests.tiny_models import tiny_gpt2

TEXTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox.", "A cat sat on the mat."]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2(directory)
    return attnjax.load(directory)


def test_causal_scores_match_the_definitions_and_the_stats(model):
    trace = attnjax.run(model, TEXTS, capture=attnjax.Capture(attention=True))
    assert trace.causal and not np.asarray(trace.mask).all()  # the shorter text is padded
    scores = analysis.head_scores(trace)
    expected = reference_head_scores(np.asarray(trace.attention), np.asarray(trace.mask),
                                     np.asarray(trace.input_ids), np.array(trace.tokens, object), causal=True)
    for name in SCORES:
        np.testing.assert_allclose(scores[name], expected[name].reshape(-1), rtol=1e-5, atol=1e-6, err_msg=name)
    assert scores["cls"].isna().all() and scores["sep"].isna().all()  # GPT-2 has neither
    assert np.allclose(scores["next_token"], 0.0)
    assert (scores["punctuation"] > 0).any()  # "." and "," are GPT-2 tokens here

    streamed = analysis.head_scores(attnjax.run(model, TEXTS, capture=attnjax.Capture(stats=True)))
    for name in ("entropy", "normalized_entropy", "max_weight", "self", "previous_token", "first_token",
                 "punctuation", "mean_distance", "jump"):
        np.testing.assert_allclose(streamed[name], scores[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # the stats know only the top weight, not the top two: never more concentrated
    assert (streamed["concentrated"] <= scores["concentrated"] + 1e-9).all()


def test_causal_cross_layer_analyses(model):
    trace = attnjax.run(model, TEXTS, capture=attnjax.Capture(attention=True))
    joint = np.asarray(analysis.rollout(trace))
    mask = np.asarray(trace.mask)
    np.testing.assert_allclose(joint[-1].sum(-1)[mask], 1.0, rtol=1e-5)
    assert np.allclose(np.triu(joint[-1, 0], k=1), 0.0)  # nothing flows from the future
    flow = analysis.attention_flow(trace, sequence=1)
    assert (flow.loc[flow["key"] > flow["query"], "max_flow"] == 0).all()
    assert set(analysis.detect_anomalies(trace, flagged_only=False)["kind"]) <= set(analysis.KINDS)
    assert len(analysis.token_flow(trace, 3, sequence=1)) == 2 * 5 * 4  # 2 layers x (mean + 4 heads) x keys 0..3
