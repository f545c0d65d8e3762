"""Sliding-window layers in attnjax.analysis: visibility, entropy and eligibility per layer.

Under a window W query i sees keys i - W < k <= i (Mistral every layer, Gemma 2
alternating). The Traces here are built by hand so every answer is known: uniform
attention over the W visible keys has normalized entropy exactly 1; mass outside the
window is attention on a hidden key. The last test runs a tiny Mistral end to end.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import analysis
from attnjax.analysis._terms import (
    earlier_matches,
    follows_earlier,
    previous_occurrence,
    visible_counts,
    visible_keys,
)
from attnjax.kernels.reference import MASK_VALUE, reference_stats
from attnjax.trace import Capture, Trace
from test_analysis_reference import SCORES, reference_anomaly_scores, reference_head_scores

W = 4
SEQ = 12


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def band(seq, window):
    """(T, T) bool: i - W < k <= i (every k <= i for window None)."""
    back = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    return (back >= 0) & (True if window is None else back < window)


def windowed_trace(attention, input_ids, windows, mask=None, stats=False):
    """A causal Trace of attention (L, B, H, T, T) with per-layer windows; with stats=True
    the same maps as streaming statistics only (attnjax.kernels.reference_stats)."""
    attention = np.asarray(attention, np.float32)
    input_ids = np.asarray(input_ids, np.int32)
    mask = np.ones(input_ids.shape, bool) if mask is None else np.asarray(mask, bool)
    common = dict(mask=jnp.asarray(mask), input_ids=jnp.asarray(input_ids), causal=True, windows=tuple(windows))
    if not stats:
        return Trace(attention=jnp.asarray(attention), **common)
    num_layers, batch, heads, seq, _ = attention.shape
    scores = np.where(attention > 0, np.log(np.maximum(attention, 1e-30)), MASK_VALUE)  # softmax gives back attention

    def by_head(array):  # (L, B, H, T, T) -> (B, L * H, T, T): every layer in one call
        return jnp.asarray(np.moveaxis(array, 0, 1).reshape(batch, num_layers * heads, seq, seq))

    stats = jax.jit(reference_stats)(by_head(scores), by_head(attention), jnp.asarray(mask))
    stats = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(batch, num_layers, heads, -1), 1, 0), stats)  # (L, B, H, T)
    return Trace(stats=stats, **common)


def uniform_in_window(seq, window):
    """(T, T) rows uniform over the keys i - W < k <= i."""
    visible = band(seq, window).astype(np.float64)
    return visible / visible.sum(-1, keepdims=True)


def random_windowed(rng, num_layers, batch, heads, seq, mask, windows, sharpness=2.0):
    """Softmax of random logits over each layer's visible keys, (L, B, H, T, T); a (padding)
    query that sees no key gets a row of zeros, as the kernels give it."""
    logits = rng.normal(size=(num_layers, batch, heads, seq, seq)) * sharpness
    visible = np.stack([mask[:, None, None, :] & band(seq, w)[None, None] for w in windows])  # (L, B, 1, T, T)
    weights = np.where(visible, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    total = weights.sum(-1, keepdims=True)
    return weights / np.where(total > 0, total, 1.0)


# ------------------------------------------------------------------ visibility


def test_visible_keys_and_counts_follow_the_window(rng):
    mask = rng.random((3, SEQ)) > 0.2
    mask[:, 0] = True
    for window in (None, 1, W, SEQ + 3):
        visible = np.asarray(visible_keys(jnp.asarray(mask), True, window))
        np.testing.assert_array_equal(visible, mask[:, None, :] & band(SEQ, window)[None])
        np.testing.assert_array_equal(np.asarray(visible_counts(jnp.asarray(mask), True, window)), visible.sum(-1))
    np.testing.assert_array_equal(np.asarray(visible_counts(jnp.asarray(mask), False)),
                                  np.broadcast_to(mask.sum(-1, keepdims=True), mask.shape))
    with pytest.raises(ValueError, match="needs causal"):
        visible_keys(jnp.asarray(mask), False, W)


def test_previous_occurrence_and_follows_earlier_read_the_selectors(rng):
    ids = rng.integers(0, 4, size=(3, SEQ))
    mask = np.ones((3, SEQ), bool)
    mask[1, 8:] = False
    mask[2, :3] = False  # left padding: earlier copies there do not count
    duplicate, induction = (np.asarray(x) for x in earlier_matches(jnp.asarray(ids), jnp.asarray(mask)))
    latest = np.where(duplicate.any(-1), SEQ - 1 - np.argmax(duplicate[..., ::-1], -1), -1)
    np.testing.assert_array_equal(np.asarray(previous_occurrence(jnp.asarray(ids), jnp.asarray(mask))), latest)
    keys = rng.integers(0, SEQ, size=(2, 3, 2, SEQ))  # (L, B, H, T) any key per query
    content = duplicate | induction
    expected = content[np.arange(3)[None, :, None, None], np.arange(SEQ)[None, None, None, :], keys]
    np.testing.assert_array_equal(
        np.asarray(follows_earlier(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(keys))), expected)


# ------------------------------------------------------- hand-built windowed Traces


def test_uniform_over_the_window_is_exactly_one_and_broad():
    # Layer 0 slides (W = 4): uniform over its visible keys. Layer 1 sees everything:
    # uniform over every earlier key. Both are as spread out as they can be.
    ids = np.arange(SEQ)[None]
    attention = np.stack([uniform_in_window(SEQ, W), uniform_in_window(SEQ, None)])[:, None, None]  # (2, 1, 1, T, T)
    entropy = [np.mean([math.log(min(i + 1, w)) for i in range(SEQ)]) for w in (W, SEQ)]
    for stats in (False, True):
        trace = windowed_trace(attention, ids, (W, None), stats=stats)
        scores = analysis.head_scores(trace)
        assert scores["source"].tolist() == ["stats" if stats else "attention"] * 2
        np.testing.assert_allclose(scores["normalized_entropy"], [1.0, 1.0], rtol=1e-5)
        np.testing.assert_allclose(scores["entropy"], entropy, rtol=1e-5)
        assert analysis.classify_heads(scores)["category"].tolist() == ["broad", "broad"]
    # Without the window the windowed layer looks focused (ln 4 over ln(i + 1) keys: 0.76
    # on average) and is not broad; the full layer is unchanged.
    unaware = analysis.classify_heads(analysis.head_scores(windowed_trace(attention, ids, ())))
    assert unaware.loc[0, "normalized_entropy"] == pytest.approx(np.mean([1.0] + [
        math.log(min(i + 1, W)) / math.log(i + 1) for i in range(1, SEQ)][1:]), rel=1e-5)
    assert unaware["category"].tolist()[0] != "broad"
    assert unaware.loc[1, "normalized_entropy"] == pytest.approx(1.0, rel=1e-5)


def test_mass_outside_the_window_is_hidden():
    ids = np.arange(SEQ)[None]
    full = np.stack([uniform_in_window(SEQ, None)] * 2)[:, None, None]  # (2, 1, 1, T, T) every earlier key
    with pytest.raises(ValueError, match="out-of-window keys"):
        analysis.head_scores(windowed_trace(full, ids, (W, None)))  # row checks in the scores pass
    with pytest.raises(ValueError, match="out-of-window keys"):
        analysis.rollout(windowed_trace(full, ids, (W, None)))  # ... and on their own
    analysis.head_scores(windowed_trace(full, ids, (SEQ, None)))  # fine when the window covers the sequence


def test_window_decides_which_queries_are_eligible():
    # a b c d e f a b c d e f: each second-half token's copy is 6 back. A window of 4
    # hides it (no eligible query: NaN); a window of 6 shows the key after the copy
    # (induction eligible) but not the copy itself (duplicate NaN); 7 shows both.
    ids = np.tile(np.arange(6), 2)[None]
    induction = np.zeros((SEQ, SEQ))
    induction[:6] = uniform_in_window(SEQ, 1)[:6]  # first half: self
    induction[np.arange(6, SEQ), np.arange(1, 7)] = 1.0  # second half: the token after the copy
    windows = (4, 6, 7, None)
    attention = np.stack([uniform_in_window(SEQ, 4)] + [induction] * 3)[:, None, None]  # (4, 1, 1, T, T)
    scores = analysis.head_scores(windowed_trace(attention, ids, windows)).set_index("layer")
    assert scores.loc[0, ["induction", "duplicate"]].isna().all()
    assert scores.loc[1, "induction"] == pytest.approx(1.0) and np.isnan(scores.loc[1, "duplicate"])
    assert scores.loc[2, "induction"] == pytest.approx(1.0) and scores.loc[2, "duplicate"] == pytest.approx(0.0)
    assert scores.loc[3, "induction"] == pytest.approx(1.0)
    # first_token averages the queries that see position 0: i < W
    assert scores.loc[0, "first_token"] == pytest.approx(np.mean([1 / (i + 1) for i in range(4)]))
    assert scores.loc[3, "first_token"] == pytest.approx(1 / SEQ)  # every query; only query 0 is on key 0
    assert (scores["n_queries"] == SEQ).all()


def test_random_windowed_maps_match_the_reference(rng):
    # Gemma-2-like alternation with padding; a window of 1 (self only) too.
    windows = (W, None, 1)
    mask = np.ones((3, SEQ), bool)
    mask[1, 9:] = False
    mask[2, 5:] = False
    ids = rng.integers(0, 5, size=(3, SEQ))  # small vocabulary: many repeats, some out of reach
    attention = random_windowed(rng, len(windows), 3, 2, SEQ, mask, windows)
    expected = reference_head_scores(attention, mask, ids, causal=True, windows=windows)
    for stats in (False, True):
        scores = analysis.head_scores(windowed_trace(attention, ids, windows, mask, stats=stats))
        for name in SCORES:
            if stats and name in ("next_token", "induction", "duplicate"):
                continue
            np.testing.assert_allclose(scores[name].to_numpy(), expected[name].reshape(-1), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} (stats={stats})")
        # jump divides each argmax step by the span the argmax can range over: min(tokens, W)
        # (these sequences are shorter than the jump score's minimum length: judged anyway)
        _, jump = reference_anomaly_scores(attention, mask, ids, windows=windows, min_jump=0)
        judged = analysis.head_scores(windowed_trace(attention, ids, windows, mask, stats=stats), min_tokens_jump=0)
        assert np.isfinite(jump).all()
        np.testing.assert_allclose(judged["jump"].to_numpy(), jump.reshape(-1), atol=1e-7)
    assert np.isnan(expected["previous_token"][2]).all()  # W = 1: the previous token is out of reach


def test_token_flow_lists_the_keys_in_each_layers_window():
    ids = np.arange(SEQ)[None]
    attention = np.stack([uniform_in_window(SEQ, W), uniform_in_window(SEQ, None)])[:, None, None]
    flow = analysis.token_flow(windowed_trace(attention, ids, (W, None)), SEQ - 1, head=0)
    keys = flow[flow["head"] == 0].groupby("layer")["key"].apply(list)
    assert keys[0] == list(range(SEQ - W, SEQ)) and keys[1] == list(range(SEQ))


def test_windows_must_fit_the_trace():
    ids = np.arange(SEQ)[None]
    attention = uniform_in_window(SEQ, W)[None, None, None]
    with pytest.raises(ValueError, match="names 2 layers"):
        analysis.head_scores(windowed_trace(attention, ids, (W, W)))
    with pytest.raises(ValueError, match="needs Trace.causal=True"):
        analysis.head_scores(windowed_trace(attention, ids, (W,)).replace(causal=False))
    with pytest.raises(ValueError, match="sliding windows"):
        analysis.head_scores([windowed_trace(attention, ids, (W,)), windowed_trace(attention, ids, (W + 1,))])


# ------------------------------------------------------------------ end to end


def test_tiny_mistral_maps_and_stats_agree(tmp_path):
    from tests.tiny_decoders import tiny_decoder

    tiny_decoder(tmp_path, "mistral-window", with_tokenizer=False)  # sliding_window=5 on both layers
    model = attnjax.load(tmp_path)
    input_ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 16))  # 3 windows long
    mask = np.arange(16)[None] < np.array([[16], [11]])  # right padding
    _, maps = model.jit_forward(model.params, input_ids, mask, capture=Capture(attention=True), logits="none")
    _, stats = model.jit_forward(model.params, input_ids, mask, capture=Capture(stats=True), logits="none")
    assert maps.windows == stats.windows == (5, 5)
    from_maps, from_stats = analysis.head_scores(maps), analysis.head_scores(stats)
    for name in ("entropy", "normalized_entropy", "max_weight", "first_token", "mean_distance"):
        np.testing.assert_allclose(from_stats[name], from_maps[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert (from_maps["normalized_entropy"] <= 1.0 + 1e-5).all()
