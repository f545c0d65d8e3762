"""Capture(stats=True) through the models: streaming statistics equal the ones read
off the full attention capture of the same input (kernels.reference_stats)."""

from __future__ import annotations

import numpy as np
import pytest

import attnjax
from attnjax import Capture
from attnjax.kernels import reference_stats
from tests.tiny_models import tiny_gpt2

STATS = ("lse", "entropy", "max_prob", "first_mass", "self_mass", "prev_mass", "mean_distance", "received",
         "pooled")


def assert_stats_match(streamed, full, pool):
    """Statistics of a stats-only forward (the streaming kernel) against the ones read
    off a full capture of the same input, and against a capture of both at once."""
    assert streamed.attention is None and streamed.layers == full.layers
    for i in range(len(full.layers)):
        expected = reference_stats(full.scores[i], full.attention[i], full.mask, pool=pool)
        for name in STATS:
            # float32 online softmax vs the dense softmax: entropy and distances sum up to
            # T terms of magnitude up to T, so 1e-4 absolute / 1e-4 relative.
            for trace, source in ((streamed, "streamed"), (full, "full capture")):
                np.testing.assert_allclose(getattr(trace.stats, name)[i], getattr(expected, name), atol=1e-4,
                                           rtol=1e-4, err_msg=f"{name}, recorded layer {i}, {source}")
        agree = np.asarray(streamed.stats.argmax[i]) == np.asarray(expected.argmax)
        assert agree.mean() > 0.999, "argmax may differ only on float ties"


def run_both(model, texts, **capture):
    streamed = attnjax.run(model, texts, capture=Capture(stats=True, **capture))
    full = attnjax.run(model, texts, capture=Capture(attention=True, scores=True, stats=True, **capture))
    return streamed, full


def test_minilm_stats_match_full_capture():
    model = attnjax.load("minilm")
    texts = ["The cat sat on the mat.", ("Is it raining?", "No, the sun is out and the sky is clear.")]
    streamed, full = run_both(model, texts, pool=4)
    assert streamed.stats.entropy.shape == (6, 2, 12, streamed.seq_len)
    assert streamed.stats.pooled.shape == (6, 2, 12, 4, 4)
    assert_stats_match(streamed, full, pool=4)


def test_gpt2_stats_match_full_capture_with_layer_selection(tmp_path):
    tiny_gpt2(tmp_path, n_layer=3)
    model = attnjax.load(tmp_path)
    streamed, full = run_both(model, ["Attention is all you need.", "A cat."], pool=3, layers=(0, 2))
    assert streamed.layers == (0, 2)
    assert_stats_match(streamed, full, pool=3)
    # Causal: the first query sees only itself.
    np.testing.assert_allclose(streamed.stats.self_mass[:, :, :, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_stats_only_capture_keeps_no_matrix(impl):
    model = attnjax.load("minilm")
    trace = attnjax.run(model, "Streaming statistics only.", capture=Capture(stats=True), attention_impl=impl)
    assert trace.attention is None and trace.scores is None
    valid = np.asarray(trace.mask)[0]
    # Every real query's attention row sums to one: sum of received mass = number of real queries.
    np.testing.assert_allclose(np.asarray(trace.stats.received).sum(-1), valid.sum(), rtol=1e-5)
