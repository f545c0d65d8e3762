"""Trace.select: checked layer and sequence selection (JAX clamps out-of-range indices,
so trace.attention[99] would silently read the last layer)."""

from __future__ import annotations

import numpy as np
import pytest

import attnjax
from attnjax import Capture


@pytest.fixture(scope="module")
def trace():
    model = attnjax.load("minilm")
    capture = Capture(attention=True, hidden_states=True, stats=True, pool=4, layers=(1, 3, 5))
    return attnjax.run(model, ["The cat sat on the mat.", "Dogs bark.", "Birds sing at dawn."], capture=capture)


def test_layers_are_model_layer_numbers(trace):
    picked = trace.select(layers=(5, 1))
    assert picked.layers == (5, 1)
    np.testing.assert_array_equal(picked.attention[0], trace.attention[2])  # layer 5 is the third recorded
    np.testing.assert_array_equal(picked.stats.pooled[1], trace.stats.pooled[0])
    assert picked.hidden_states.shape == trace.hidden_states.shape  # the model's depth, untouched


def test_sequences_keep_their_tokens_and_arrays(trace):
    picked = trace.select(sequences=(-1, 0))
    assert picked.tokens == (trace.tokens[2], trace.tokens[0])
    np.testing.assert_array_equal(picked.mask, np.asarray(trace.mask)[[2, 0]])
    np.testing.assert_array_equal(picked.attention[:, 0], trace.attention[:, 2])
    np.testing.assert_array_equal(picked.stats.entropy[:, 1], trace.stats.entropy[:, 0])
    np.testing.assert_array_equal(picked.hidden_states[:, 0], trace.hidden_states[:, 2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=(99,)), r"layer 99 is not in this Trace, which holds layers \(1, 3, 5\)"),
    (dict(layers=(0,)), "layer 0 is not in this Trace"),
    (dict(layers=()), "selects nothing"),
    (dict(sequences=(3,)), r"sequence 3 is out of range; this Trace holds 3 \(0..2"),
    (dict(sequences=(-4,)), "sequence -4 is out of range"),
])
def test_out_of_range_is_an_error_not_a_clamp(trace, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trace.select(**kwargs)
