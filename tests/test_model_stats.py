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


def assert_stats_match(trace, pool):
    for i in range(len(trace.layers)):
        expected = reference_stats(trace.scores[i], trace.attention[i], trace.mask, pool=pool)
        for name in STATS:
            # float32 online softmax vs the dense softmax: entropy and distances sum up to
            # T terms of magnitude up to T, so 1e-4 absolute / 1e-4 relative.
            np.testing.assert_allclose(getattr(trace.stats, name)[i], getattr(expected, name), atol=1e-4,
                                       rtol=1e-4, err_msg=f"{name}, recorded layer {i}")
        agree = np.asarray(trace.stats.argmax[i]) == np.asarray(expected.argmax)
        assert agree.mean() > 0.999, "argmax may differ only on float ties"


def test_minilm_stats_match_full_capture():
    model = attnjax.load("minilm")
    texts = ["The cat sat on the mat.", ("Is it raining?", "No, the sun is out and the sky is clear.")]
    capture = Capture(attention=True, scores=True, stats=True, pool=4)
    trace = attnjax.run(model, texts, capture=capture)
    assert trace.stats.entropy.shape == (6, 2, 12, trace.seq_len)
    assert trace.stats.pooled.shape == (6, 2, 12, 4, 4)
    assert_stats_match(trace, pool=4)


def test_gpt2_stats_match_full_capture_with_layer_selection(tmp_path):
    tiny_gpt2(tmp_path, n_layer=3)
    model = attnjax.load(tmp_path)
    capture = Capture(attention=True, scores=True, stats=True, pool=3, layers=(0, 2))
    trace = attnjax.run(model, ["Attention is all you need.", "A cat."], capture=capture)
    assert trace.layers == (0, 2)
    assert_stats_match(trace, pool=3)
    # Causal: the first query sees only itself.
    np.testing.assert_allclose(trace.stats.self_mass[:, :, :, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_stats_only_capture_keeps_no_matrix(impl):
    model = attnjax.load("minilm")
    trace = attnjax.run(model, "Streaming statistics only.", capture=Capture(stats=True), attention_impl=impl)
    assert trace.attention is None and trace.scores is None
    valid = np.asarray(trace.mask)[0]
    # Every real query's attention row sums to one: sum of received mass = number of real queries.
    np.testing.assert_allclose(np.asarray(trace.stats.received).sum(-1), valid.sum(), rtol=1e-5)
