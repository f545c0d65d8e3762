"""next_token, duplicate and induction without the maps: Capture(stats=True, qkv=True).

analysis._qk_terms recomputes each row's weights tile by tile from the recorded q, k and
the kernel's lse. The answer is known: the same per-query quantities that the full maps
give (analysis._terms.attention_score_terms), and so the same head_scores columns,
for an encoder, GQA / MQA decoders, sliding windows and Gemma 2's soft-caps, with tiles
smaller than the sequence so that block edges, skipped causal tiles and window
bounds are all exercised.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import analysis
from attnjax.analysis._common import trace_windows
from attnjax.analysis._qk_terms import _qk_match_terms
from attnjax.analysis._terms import attention_score_terms
from attnjax.trace import Capture
from tests.tiny_decoders import tiny_decoder

MATCH = ("next_token", "duplicate", "induction")
# Repeats at several distances, so induction and duplicate have earlier copies to find.
TEXT = "the cat sat on the mat and the cat saw the dog so the dog sat on the cat"
BOTH = Capture(stats=True, qkv=True)
# float32: exp(s - lse) carries the rounding of the recomputed score s and of the
# kernel's lse, each about |s| x 2^-24 (~2e-6 at |s| ~ 30), as a relative error of the
# weight; a mass adds a few dozen weights.
ATOL, RTOL = 2e-6, 1e-5


def per_query_terms(trace, block):
    """(from the maps, recomputed from q, k and lse with tiles of ``block``) per query."""
    windows = trace_windows(trace)
    classes = jnp.zeros(trace.mask.shape + (3,), jnp.float32)
    maps = attention_score_terms(trace.attention, trace.mask, trace.input_ids, classes, causal=trace.causal,
                                 windows=windows)
    heads = trace.queries.shape[2]
    scales = tuple(float(s) for s in trace.scales)
    softcaps = tuple(trace.softcaps) if trace.softcaps else (None,) * len(scales)
    recomputed = _qk_match_terms(trace.queries, trace.keys, trace.stats.lse, trace.mask, trace.input_ids,
                                 causal=trace.causal, windows=windows, scales=scales, softcaps=softcaps,
                                 block=block)
    assert recomputed["induction"].shape == maps["induction"].shape[:2] + (heads,) + maps["induction"].shape[3:]
    return maps, recomputed


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


def test_an_encoders_masses_equal_the_maps_over_tiles(minilm):
    trace = attnjax.run(minilm, [TEXT, "a shorter one with one one repeat"],
                        capture=Capture(attention=True, stats=True, qkv=True))
    for block in (8, 512):  # 3 tiles a side (32 padded positions), and one tile
        maps, recomputed = per_query_terms(trace, block)
        mask = np.asarray(trace.mask)[None, :, None, :]
        for name in MATCH:
            np.testing.assert_allclose(np.where(mask, recomputed[name], 0), np.where(mask, maps[name], 0),
                                       atol=ATOL, rtol=RTOL, err_msg=f"{name}, block {block}")
    assert float(np.max(maps["induction"])) > 0.05 and float(np.max(maps["next_token"])) > 0.05  # not all zero


def test_head_scores_from_stats_and_qkv_equal_the_maps(minilm):
    with_maps = analysis.head_scores(attnjax.run(minilm, TEXT, capture=Capture(attention=True)))
    from_qk = analysis.head_scores(attnjax.run(minilm, TEXT, capture=BOTH))
    assert set(from_qk["source"]) == {"stats"}
    for name in MATCH:
        np.testing.assert_allclose(from_qk[name], with_maps[name], atol=1e-5, err_msg=name)
    stats_only = analysis.head_scores(attnjax.run(minilm, TEXT, capture=Capture(stats=True)))
    assert stats_only[list(MATCH)].isna().all().all()  # without q and k they stay unknown


@pytest.mark.parametrize("name", ["gemma2", "mistral-window", "llama-mqa-linear-tied"])
def test_decoders_masses_equal_the_maps_over_tiles(tmp_path, name):
    # Gemma 2: soft-caps, alternating windows of 4, GQA; Mistral: windows of 5 on every
    # layer; Llama: one kv head. Tiles of 4 positions: causal tiles above the diagonal
    # and tiles left of a window are skipped, and must hold no mass.
    tiny_decoder(tmp_path, name)
    model = attnjax.load(tmp_path)
    trace = attnjax.run(model, TEXT, capture=Capture(attention=True, stats=True, qkv=True))
    assert trace.causal
    for block in (4, 512):
        maps, recomputed = per_query_terms(trace, block)
        mask = np.asarray(trace.mask)[None, :, None, :]
        for term in MATCH:
            np.testing.assert_allclose(np.where(mask, recomputed[term], 0), np.where(mask, maps[term], 0),
                                       atol=ATOL, rtol=RTOL, err_msg=f"{name}: {term}, block {block}")
    assert float(np.max(maps["duplicate"])) > 0.05
    scores = analysis.head_scores(attnjax.run(model, TEXT, capture=BOTH))
    expected = analysis.head_scores(attnjax.run(model, TEXT, capture=Capture(attention=True)))
    for term in MATCH:
        np.testing.assert_allclose(scores[term], expected[term], atol=1e-5, err_msg=f"{name}: {term}")


def test_no_t_by_t_array_at_long_context():
    # 1100 positions, over two 512-key tiles: the recomputation must hold only tiles.
    import jax

    from tests.test_forward_api import all_shapes

    seq, heads, dim = 1100, 2, 8
    args = (jax.ShapeDtypeStruct((1, 1, heads, seq, dim), jnp.float32),   # queries (L, B, H, T, D)
            jax.ShapeDtypeStruct((1, 1, 1, seq, dim), jnp.float32),       # keys (L, B, Hkv, T, D)
            jax.ShapeDtypeStruct((1, 1, heads, seq), jnp.float32),        # lse (L, B, H, T)
            jax.ShapeDtypeStruct((1, seq), jnp.bool_), jax.ShapeDtypeStruct((1, seq), jnp.int32))
    for causal in (False, True):
        program = jax.make_jaxpr(lambda *a: _qk_match_terms(*a, causal=causal, windows=(None,), scales=(0.35,),
                                                            softcaps=(None,)))(*args)
        big = [s for s in all_shapes(program.jaxpr) if len(s) >= 2 and min(s[-2:]) > 512]
        assert not big, big
