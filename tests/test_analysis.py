"""attnjax.analysis on synthetic Traces whose answers are known by construction."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from attnjax import analysis
from attnjax.kernels.reference import MASK_VALUE, reference_stats
from attnjax.trace import Trace
from test_analysis_reference import (
    SCORES,
    reference_anomaly_scores,
    reference_flow,
    reference_head_scores,
    reference_rollout,
    reference_similarity,
)

CLS, SEP = 101, 102


def make_trace(attention, input_ids, tokens=None, mask=None, causal=False, layers=()):
    attention = np.asarray(attention, np.float32)
    input_ids = np.asarray(input_ids, np.int32)
    if mask is None:
        mask = np.ones(input_ids.shape, bool)
    return Trace(
        mask=jnp.asarray(mask), input_ids=jnp.asarray(input_ids), attention=jnp.asarray(attention),
        tokens=None if tokens is None else tuple(tuple(row) for row in tokens), causal=causal,
        layers=tuple(layers),
    )


def softmax_rows(logits, visible):
    logits = np.where(visible, logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    weights = np.where(visible, np.exp(logits), 0.0)
    return weights / weights.sum(-1, keepdims=True)


def random_attention(rng, num_layers, batch, heads, seq, mask, causal=False, sharpness=2.0):
    visible = np.broadcast_to(mask[:, None, None, :], (batch, 1, seq, seq)).copy()
    if causal:
        visible &= np.tril(np.ones((seq, seq), bool))[None, None]
    logits = rng.normal(size=(num_layers, batch, heads, seq, seq)) * sharpness
    return softmax_rows(logits, visible[None]), logits


# A repeated random sequence, as TransformerLens builds induction tests:
# [CLS] r_1 .. r_m r_1 .. r_m [SEP], with m distinct random ids.
M = 10
SEQ = 2 * M + 2


def repeated_sequence(rng):
    body = rng.choice(np.arange(1000, 2000), size=M, replace=False)
    ids = np.concatenate([[CLS], body, body, [SEP]])
    tokens = ["[CLS]"] + [f"w{i}" for i in body] * 2 + ["[SEP]"]
    return ids[None], [tokens]


def known_heads():
    """Five heads over the repeated sequence: previous-token, [CLS], uniform, induction, duplicate."""
    previous = np.eye(SEQ, k=-1)
    previous[0, 0] = 1.0
    sink = np.zeros((SEQ, SEQ))
    sink[:, 0] = 1.0
    uniform = np.full((SEQ, SEQ), 1.0 / SEQ)
    induction = sink.copy()
    duplicate = sink.copy()
    for j in range(M):  # query M + 1 + j repeats position 1 + j
        query = M + 1 + j
        induction[query] = 0.0
        induction[query, 2 + j] = 1.0  # the token after the earlier copy
        duplicate[query] = 0.0
        duplicate[query, 1 + j] = 1.0  # the earlier copy itself
    return np.stack([previous, sink, uniform, induction, duplicate])[None, None]  # (1, 1, 5, T, T)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_known_heads_are_scored_and_classified_as_built(rng):
    ids, tokens = repeated_sequence(rng)
    trace = make_trace(known_heads(), ids, tokens)
    scores = analysis.head_scores(trace).set_index("head")
    # previous-token head: all of every query i >= 1 on i - 1
    assert scores.loc[0, "previous_token"] == pytest.approx(1.0)
    assert scores.loc[0, "mean_distance"] == pytest.approx((SEQ - 1) / SEQ)  # query 0 looks at itself
    # [CLS] head: everything on position 0, which is [CLS]
    assert scores.loc[1, "cls"] == pytest.approx(1.0)
    assert scores.loc[1, "first_token"] == pytest.approx(1.0)
    assert scores.loc[1, "sep"] == pytest.approx(0.0)
    assert scores.loc[1, "self"] == pytest.approx(1.0 / SEQ)  # only [CLS] itself
    # uniform head: entropy ln T, normalized 1, max weight 1/T
    assert scores.loc[2, "entropy"] == pytest.approx(math.log(SEQ), rel=1e-5)
    assert scores.loc[2, "normalized_entropy"] == pytest.approx(1.0, rel=1e-5)
    assert scores.loc[2, "max_weight"] == pytest.approx(1.0 / SEQ)
    # induction head: every repeated token on the token after its earlier copy
    assert scores.loc[3, "induction"] == pytest.approx(1.0)
    assert scores.loc[3, "duplicate"] == pytest.approx(0.0)
    assert scores.loc[4, "duplicate"] == pytest.approx(1.0)
    assert scores.loc[4, "induction"] == pytest.approx(0.0)
    # no punctuation tokens in this input
    assert scores["punctuation"].isna().all()

    categories = analysis.classify_heads(analysis.head_scores(trace)).set_index("head")
    assert categories["category"].tolist() == ["previous-token", "sink", "broad", "induction", "duplicate"]
    assert categories.loc[0, "decided_by"] == "previous_token"
    assert categories.loc[1, "decided_by"] in ("cls", "first_token")
    assert categories.loc[2, "decision_threshold"] == pytest.approx(analysis.HeadThresholds().broad)
    assert categories.loc[3, "decision_score"] == pytest.approx(1.0)


def test_no_repeats_gives_nan_induction(rng):
    ids = np.array([[CLS, 5, 6, 7, 8, SEP]])
    attention = np.full((1, 1, 1, 6, 6), 1 / 6)
    scores = analysis.head_scores(make_trace(attention, ids))
    assert np.isnan(scores.loc[0, "induction"]) and np.isnan(scores.loc[0, "duplicate"])
    assert np.isnan(scores.loc[0, "cls"])  # no tokens attached: special-token columns unknown
    assert analysis.classify_heads(scores).loc[0, "category"] == "broad"


def test_thresholds_are_parameters():
    ids = np.array([[1, 2, 3, 4]])
    previous = np.eye(4, k=-1) * 0.45 + np.eye(4) * 0.55
    previous[0, 0] = 1.0
    scores = analysis.head_scores(make_trace(previous[None, None, None], ids))
    assert analysis.classify_heads(scores).loc[0, "category"] == "self"  # self 0.66 >= 0.5, previous 0.45 < 0.5
    relaxed = analysis.classify_heads(scores, {"previous_token": 0.2, "self": 0.9})
    assert relaxed.loc[0, "category"] == "previous-token"
    with pytest.raises(ValueError, match="Unknown head thresholds"):
        analysis.classify_heads(scores, {"prev": 0.2})


def previous_plus_uniform(seq, mass=0.55):
    """``mass`` on the previous token (query 0: on itself), the rest spread evenly over the others."""
    rows = np.full((seq, seq), (1 - mass) / (seq - 1))
    target = np.maximum(np.arange(seq) - 1, 0)
    rows[np.arange(seq), target] = mass
    return rows


def test_taxonomy_thresholds_count_mass_above_chance():
    # 0.55 on the previous token is a previous-token head among 64 keys (chance 1/64: the cut
    # is 0.507), but not among 4 keys, where uniform attention already gives 0.25 (cut 0.625).
    long = analysis.head_scores(make_trace(previous_plus_uniform(64)[None, None, None], np.arange(64)[None]))
    short = analysis.head_scores(make_trace(previous_plus_uniform(4)[None, None, None], np.arange(4)[None]))
    assert short.loc[0, "chance_key"] == pytest.approx(0.25) and long.loc[0, "chance_key"] == pytest.approx(1 / 64)
    assert short.loc[0, "chance_distance"] == pytest.approx((4 * 4 - 1) / (3 * 4))  # mean |i - k|, uniform
    long, short = analysis.classify_heads(long), analysis.classify_heads(short)
    assert long.loc[0, "category"] == "previous-token"
    assert long.loc[0, "decision_threshold"] == pytest.approx(1 / 64 + 0.5 * 63 / 64)
    assert short.loc[0, "category"] != "previous-token"
    # the chance of a class of keys counts its visible members: 1 [CLS] of 4 keys
    tokens = [["[CLS]", "a", "b", "[SEP]"]]
    sink = np.zeros((4, 4))
    sink[:, 0] = 0.65
    sink[:, 1:] = 0.35 / 3
    scores = analysis.classify_heads(analysis.head_scores(make_trace(sink[None, None, None], [[CLS, 5, 6, SEP]], tokens)))
    assert scores.loc[0, "chance_cls"] == pytest.approx(0.25)
    assert scores.loc[0, "category"] != "sink"  # 0.65 < 0.25 + 0.6 * 0.75 = 0.7


@pytest.mark.parametrize("causal", [False, True])
def test_head_scores_match_reference_with_padding(rng, causal):
    batch, seq, heads, num_layers = 3, 12, 4, 2
    mask = np.ones((batch, seq), bool)
    mask[1, 9:] = False
    mask[2, 5:] = False
    ids = rng.integers(0, 6, size=(batch, seq))  # small vocabulary: many repeats
    vocab = np.array(["[CLS]", "[SEP]", ".", ",", "Ġ.", "x"], dtype=object)
    tokens = np.where(mask, vocab[ids], "[PAD]")
    attention, _ = random_attention(rng, num_layers, batch, heads, seq, mask, causal)
    trace = make_trace(attention, ids, tokens, mask, causal=causal)
    scores = analysis.head_scores(trace)
    expected = reference_head_scores(attention, mask, ids, tokens, causal=causal)
    for name in SCORES:
        np.testing.assert_allclose(scores[name].to_numpy(), expected[name].reshape(-1), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert (scores["n_queries"] == mask.sum()).all()
    if causal:
        assert np.allclose(scores["next_token"], 0.0)  # a causal head never sees the next token


def test_corpus_list_equals_one_padded_batch(rng):
    # Two traces of different lengths, and the same two sequences as one padded batch.
    seq = 9
    mask = np.array([[True] * 9, [True] * 6 + [False] * 3])
    ids = rng.integers(0, 5, size=(2, seq))
    attention, _ = random_attention(rng, 2, 2, 3, seq, mask)
    batch = make_trace(attention, ids, mask=mask)
    first = make_trace(attention[:, :1], ids[:1])
    second = make_trace(attention[:, 1:, :, :6, :6], ids[1:, :6])
    together = analysis.head_scores(batch)
    corpus = analysis.head_scores([first, second])
    pd.testing.assert_frame_equal(together, corpus, rtol=1e-5)
    assert analysis.focus_by_layer([first, second])["n_queries"].tolist() == [15, 15]


def stats_trace(rng, causal=False):
    """The same random attention as a full Trace and as a stats-only Trace."""
    num_layers, batch, heads, seq = 2, 2, 3, 10
    mask = np.ones((batch, seq), bool)
    mask[1, 7:] = False
    visible = np.broadcast_to(mask[:, None, None, :], (batch, 1, seq, seq)).copy()
    if causal:
        visible &= np.tril(np.ones((seq, seq), bool))[None, None]
    logits = rng.normal(size=(num_layers, batch, heads, seq, seq)).astype(np.float32) * 2
    scores = np.where(visible[None], logits, MASK_VALUE)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(scores), axis=-1)) * visible[None]
    per_layer = [reference_stats(jnp.asarray(scores[i]), jnp.asarray(probs[i]), jnp.asarray(mask), pool=5)
                 for i in range(num_layers)]
    stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    ids = rng.integers(0, 4, size=(batch, seq))
    vocab = np.array(["[CLS]", "[SEP]", ".", "x"], dtype=object)
    tokens = np.where(mask, vocab[ids], "[PAD]")
    full = make_trace(probs, ids, tokens, mask, causal)
    stats_only = Trace(mask=jnp.asarray(mask), input_ids=jnp.asarray(ids, jnp.int32), stats=stats,
                       tokens=full.tokens, causal=causal)
    return full, stats_only


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_and_full_paths_agree(rng, causal):
    full, stats_only = stats_trace(rng, causal)
    from_maps = analysis.head_scores(full)
    from_stats = analysis.head_scores(stats_only)
    assert (from_stats["source"] == "stats").all() and (from_maps["source"] == "attention").all()
    for name in SCORES:
        if name in ("next_token", "induction", "duplicate"):
            assert from_stats[name].isna().all(), name  # these need the maps
        else:
            np.testing.assert_allclose(from_stats[name], from_maps[name], rtol=1e-5, atol=1e-6, err_msg=name)
    pd.testing.assert_frame_equal(analysis.focus_by_layer(full), analysis.focus_by_layer(stats_only), rtol=1e-5)
    # anomaly scores that both paths define: over-dispersed and jumping agree exactly
    # (these texts are under the minimum lengths: judged anyway, to compare the two paths)
    judge = {"min_tokens_concentrated": 0, "min_tokens_jump": 0}
    a = analysis.detect_anomalies(full, judge, flagged_only=False).set_index(["layer", "head", "kind"])["score"]
    b = analysis.detect_anomalies(stats_only, judge, flagged_only=False).set_index(["layer", "head", "kind"])["score"]
    assert np.isfinite(a).all() and np.isfinite(b).all()
    for kind in ("over-dispersed", "jumping"):
        np.testing.assert_allclose(a.xs(kind, level="kind"), b.xs(kind, level="kind"), atol=1e-6)
    # stats see only the top-1 weight: never more concentrated than the top-2 view
    assert (b.xs("over-concentrated", level="kind") <= a.xs("over-concentrated", level="kind") + 1e-9).all()
    # pooled maps give a coarse layer similarity of the same shape
    assert (analysis.layer_similarity(stats_only)["source"] == "pooled").all()


def test_inputs_are_not_modified(rng):
    mask = np.ones((1, 8), bool)
    attention, _ = random_attention(rng, 2, 1, 2, 8, mask)
    trace = make_trace(attention, rng.integers(0, 3, size=(1, 8)), mask=mask)
    before = np.asarray(trace.attention).copy()
    scores = analysis.head_scores(trace)
    scores_before = scores.copy()
    analysis.classify_heads(scores)
    analysis.detect_anomalies(trace)
    analysis.rollout(trace)
    analysis.compare(trace, trace)
    np.testing.assert_array_equal(np.asarray(trace.attention), before)
    pd.testing.assert_frame_equal(scores, scores_before)


# ---------------------------------------------------------------- bad input


def test_empty_batch_is_an_error():
    trace = Trace(mask=jnp.zeros((0, 4), bool), input_ids=jnp.zeros((0, 4), jnp.int32),
                  attention=jnp.zeros((1, 0, 1, 4, 4)))
    with pytest.raises(ValueError, match="empty batch"):
        analysis.head_scores(trace)
    with pytest.raises(ValueError, match="empty list"):
        analysis.head_scores([])


def test_rows_that_do_not_sum_to_one_are_an_error(rng):
    attention = np.full((1, 1, 2, 4, 4), 0.25)
    attention[0, 0, 1, 2] = 0.3  # row sums to 1.2
    trace = make_trace(attention, np.arange(4)[None])
    for function in (analysis.head_scores, analysis.rollout, analysis.layer_similarity, analysis.detect_anomalies):
        with pytest.raises(ValueError, match="sum to 1.*head 1, sequence 0, query 2"):
            function(trace)


def test_mass_on_padding_or_future_is_an_error():
    mask = np.array([[True, True, True, False]])
    attention = np.full((1, 1, 1, 4, 4), 0.25)  # sums to 1 but spreads onto the padding key
    with pytest.raises(ValueError, match="padding keys"):
        analysis.head_scores(make_trace(attention, np.arange(4)[None], mask=mask))
    causal = np.full((1, 1, 1, 3, 3), 1 / 3)  # a causal model cannot see the future
    with pytest.raises(ValueError, match="future"):
        analysis.head_scores(make_trace(causal, np.arange(3)[None], causal=True))
    scores_not_probs = np.full((1, 1, 1, 2, 2), [[-1.0, 2.0]])
    with pytest.raises(ValueError, match="negative"):
        analysis.head_scores(make_trace(scores_not_probs, np.arange(2)[None]))


def test_indices_out_of_range_are_errors(rng):
    mask = np.array([[True] * 5 + [False]])
    attention, _ = random_attention(rng, 2, 1, 2, 6, mask)
    trace = make_trace(attention, np.arange(6)[None], mask=mask, layers=(0, 1))
    with pytest.raises(ValueError, match="Layer 7 is not in this Trace"):
        analysis.attention_flow(trace, layer=7)
    with pytest.raises(ValueError, match="Layer 2 is not in this Trace"):
        analysis.token_flow(trace, 1, layer=2)
    with pytest.raises(ValueError, match="Head 2 is out of range"):
        analysis.token_flow(trace, 1, head=2)
    with pytest.raises(ValueError, match="position 5 is not a non-padding"):
        analysis.token_flow(trace, 5)
    with pytest.raises(ValueError, match="Sequence 1 is out of range"):
        analysis.rollout_frame(trace, sequence=1)
    with pytest.raises(ValueError, match="queries \\[9\\]"):
        analysis.attention_flow(trace, queries=[9])
    with pytest.raises(ValueError, match="metric"):
        analysis.layer_similarity(trace, metric="kl")


def test_one_sequence_functions_refuse_a_list_of_traces(rng):
    mask = np.ones((1, 4), bool)
    attention, _ = random_attention(rng, 1, 1, 1, 4, mask)
    trace = make_trace(attention, np.arange(4)[None])
    for call, name in ((lambda t: analysis.rollout(t), "rollout"),
                       (lambda t: analysis.rollout_frame(t), "rollout"),
                       (lambda t: analysis.attention_flow(t), "attention_flow"),
                       (lambda t: analysis.token_flow(t, 1), "token_flow"),
                       (lambda t: analysis.compare(t, trace), "compare")):
        with pytest.raises(TypeError, match=f"{name} takes one Trace \\(got list\\)"):
            call([trace, trace])


def test_gapped_layers_refuse_rollout(rng):
    mask = np.ones((1, 4), bool)
    attention, _ = random_attention(rng, 2, 1, 1, 4, mask)
    trace = make_trace(attention, np.arange(4)[None], layers=(0, 2))
    with pytest.raises(ValueError, match="consecutive"):
        analysis.rollout(trace)
    assert analysis.head_scores(trace)["layer"].tolist() == [0, 2]  # per-layer analyses are fine


# ---------------------------------------------------------------- cross-layer


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_matches_the_paper(rng, residual):
    mask = np.array([[True] * 7, [True] * 5 + [False] * 2])
    attention, _ = random_attention(rng, 4, 2, 3, 7, mask)
    trace = make_trace(attention, np.zeros((2, 7)), mask=mask)
    joint = np.asarray(analysis.rollout(trace, residual))
    for b, n in ((0, 7), (1, 5)):
        expected = reference_rollout(attention[:, b, :, :n, :n], residual)
        np.testing.assert_allclose(joint[:, b, :n, :n], expected, rtol=1e-5, atol=1e-6)
    frame = analysis.rollout_frame(trace, residual)
    assert len(frame) == 4 * (7 * 7 + 5 * 5)
    sums = frame.groupby(["layer", "sequence", "query"])["weight"].sum()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)  # rollout rows stay distributions


@pytest.mark.parametrize("num_layers", [1, 2, 4])
@pytest.mark.parametrize("residual", [True, False])
def test_attention_flow_matches_pairwise_max_flow(rng, num_layers, residual):
    n = 5
    mask = np.ones((1, n + 1), bool)
    mask[0, -1] = False  # a padding position is left out of the graph
    attention, _ = random_attention(rng, num_layers, 1, 2, n + 1, mask, sharpness=3.0)
    trace = make_trace(attention, np.zeros((1, n + 1)), mask=mask)
    flow = analysis.attention_flow(trace, residual=residual)
    values, normalised = reference_flow(attention[:, 0, :, :n, :n], residual)
    # both in float64 on the same capacities: push-relabel drops excess below 1e-12
    np.testing.assert_allclose(flow["max_flow"].to_numpy().reshape(n, n), values, atol=1e-9)
    np.testing.assert_allclose(flow["flow"].to_numpy().reshape(n, n), normalised, atol=1e-9)
    assert set(flow["key"]) == set(range(n))


def test_attention_flow_against_scipy_on_a_larger_graph(rng):
    sparse = pytest.importorskip("scipy.sparse")
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    num_layers, n = 6, 24
    mask = np.ones((1, n), bool)
    attention, _ = random_attention(rng, num_layers, 1, 4, n, mask, sharpness=4.0)
    trace = make_trace(attention, np.zeros((1, n)), mask=mask)
    queries = [0, 11]
    flow = analysis.attention_flow(trace, queries=queries)
    maps = attention[:, 0].mean(1) + np.eye(n)
    maps /= maps.sum(-1, keepdims=True)
    scale = 10**9  # scipy's max-flow takes integer capacities
    rows, cols, caps = [], [], []
    for layer in range(1, num_layers + 1):
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        rows.append((layer * n + i).ravel())
        cols.append(((layer - 1) * n + j).ravel())
        caps.append(np.round(maps[layer - 1].ravel() * scale).astype(np.int64))
    graph = sparse.csr_matrix((np.concatenate(caps), (np.concatenate(rows), np.concatenate(cols))),
                              shape=((num_layers + 1) * n,) * 2)
    expected = np.array([[csgraph.maximum_flow(graph, num_layers * n + q, j).flow_value / scale
                          for j in range(n)] for q in queries])
    # scipy rounds capacities to multiples of 1e-9: at most ~1e-9 per edge of a minimum cut
    np.testing.assert_allclose(flow["max_flow"].to_numpy().reshape(len(queries), n), expected, atol=1e-6)


def test_token_flow_ranks_and_head_mean():
    ids, tokens = repeated_sequence(np.random.default_rng(1))
    trace = make_trace(known_heads(), ids, tokens)
    frame = analysis.token_flow(trace, 5, top_k=1)
    previous = frame[(frame["head"] == 0) & frame["top"]]
    assert previous["key"].tolist() == [4] and previous["rank"].tolist() == [1]
    mean = frame[frame["head"] == analysis.ALL_HEADS].set_index("key")["weight"]
    np.testing.assert_allclose(mean.sum(), 1.0, rtol=1e-6)
    # head mean at key 0: [CLS] head 1, induction/duplicate heads (query 5 is not repeated) 1, uniform 1/T
    assert mean.loc[0] == pytest.approx((3 + 1 / SEQ) / 5, rel=1e-5)
    assert len(analysis.token_flow(trace, 5, head=1)) == 2 * SEQ


# ---------------------------------------------------------------- similarity


@pytest.mark.parametrize("metric", ["jsd", "cosine"])
def test_similarity_matches_reference(rng, metric):
    mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
    attention, _ = random_attention(rng, 3, 2, 2, 6, mask)
    trace = make_trace(attention, np.zeros((2, 6)), mask=mask)
    layers = analysis.layer_similarity(trace, metric)
    expected = reference_similarity(attention.mean(2), mask, metric)
    np.testing.assert_allclose(layers["value"].to_numpy().reshape(3, 3), expected, rtol=1e-5, atol=1e-6)
    heads = analysis.head_similarity(trace, metric)
    per_head = attention.transpose(0, 2, 1, 3, 4).reshape(6, 2, 6, 6)
    np.testing.assert_allclose(heads["value"].to_numpy().reshape(6, 6),
                               reference_similarity(per_head, mask, metric), rtol=1e-5, atol=1e-6)
    assert set(heads.columns) >= {"layer_a", "head_a", "layer_b", "head_b", "metric", "value"}


def test_similarity_of_known_heads():
    ids, tokens = repeated_sequence(np.random.default_rng(2))
    trace = make_trace(known_heads(), ids, tokens)
    table = analysis.head_similarity(trace).pivot(index="head_a", columns="head_b", values="value")
    assert np.allclose(np.diag(table), 0.0, atol=1e-6)
    # previous-token and [CLS] heads agree only where both look at [CLS] (query 1): JS = ln 2 elsewhere
    assert table.loc[0, 1] == pytest.approx(math.log(2) * (SEQ - 2) / SEQ, rel=1e-4)


# ---------------------------------------------------------------- anomalies


def anomaly_trace(rng):
    """Two layers of sharp previous-token heads, three of them replaced by odd heads."""
    seq = 40
    ids = rng.choice(np.arange(1000, 5000), size=seq, replace=False)[None]
    ids[0, 0] = CLS
    tokens = [["[CLS]"] + [f"w{i}" for i in ids[0, 1:]]]
    local = 0.85 * np.eye(seq, k=-1) + 0.15 * np.eye(seq)
    local[0, 0] = 1.0
    layers = np.repeat(np.repeat(local[None, None], 4, axis=1), 2, axis=0)  # (2, H=4, T, T)
    layers[1, 0] = 1.0 / seq  # uniform head
    layers[1, 1] = 0.0
    layers[1, 1, :, 0] = 1.0  # sink head on [CLS]
    jumps = rng.integers(0, seq, size=seq)  # argmax at random far positions
    layers[1, 2] = 0.1 / seq
    layers[1, 2, np.arange(seq), jumps] += 0.9
    return make_trace(layers[:, None], ids, tokens)


def test_detect_anomalies_finds_the_heads_that_were_built(rng):
    trace = anomaly_trace(rng)
    flagged = analysis.detect_anomalies(trace)
    found = set(zip(flagged["layer"], flagged["head"], flagged["kind"]))
    # exactly the three odd heads; sharp previous-token heads are focused, not dead
    assert found == {(1, 0, "over-dispersed"), (1, 1, "over-concentrated"), (1, 2, "jumping")}
    sink = flagged[flagged["kind"] == "over-concentrated"].iloc[0]
    assert "mostly on position 0 '[CLS]'" in sink["detail"]
    assert set(flagged.columns) == {"layer", "head", "kind", "score", "threshold", "flagged", "verdict", "detail"}
    assert flagged["flagged"].all() and (flagged["verdict"] == "flagged").all()


def test_detect_anomalies_finds_an_inconsistent_layer(rng):
    # Seven layers of previous-token heads with layer-specific noise (so neighbours differ a
    # little); layer 3 is a next-token layer and differs from both neighbours a lot.
    seq, heads = 16, 2
    base = 0.7 * np.eye(seq, k=-1) + 0.3 * np.eye(seq)
    base[0, 0] = 1.0
    odd = 0.7 * np.eye(seq, k=1) + 0.3 * np.eye(seq)
    odd[-1, -1] = 1.0
    noise = rng.dirichlet(np.ones(seq), size=(7, heads, seq))
    layers = 0.8 * np.where(np.arange(7)[:, None, None, None] == 3, odd, base) + 0.2 * noise  # (7, H, T, T)
    trace = make_trace(layers[:, None], np.arange(seq)[None])
    flagged = analysis.detect_anomalies(trace)
    inconsistent = flagged[flagged["kind"] == "layer inconsistency"]
    assert inconsistent["layer"].tolist() == [3]
    assert (inconsistent["head"] == analysis.ALL_HEADS).all()
    assert "robust z" in inconsistent.iloc[0]["detail"]
    # reusing a precomputed similarity gives the same answer
    reused = analysis.detect_anomalies(trace, similarity=analysis.layer_similarity(trace))
    pd.testing.assert_frame_equal(flagged, reused)


def test_anomaly_scores_match_reference(rng):
    trace = anomaly_trace(rng)
    attention = np.asarray(trace.attention)
    every = analysis.detect_anomalies(trace, flagged_only=False).set_index(["layer", "head", "kind"])["score"]
    concentrated, jump = reference_anomaly_scores(attention, np.asarray(trace.mask), np.asarray(trace.input_ids),
                                                  np.array(trace.tokens, object))
    np.testing.assert_allclose(every.xs("over-concentrated", level="kind").to_numpy(), concentrated.reshape(-1))
    np.testing.assert_allclose(every.xs("jumping", level="kind").to_numpy(), jump.reshape(-1), atol=1e-7)
    assert analysis.detect_anomalies(trace, {"jump": 2.0, "dispersed": 2.0, "concentrated_fraction": 2.0}).empty


def odd_heads_trace(rng, seq):
    """One layer of ``seq`` tokens: two sharp previous-token heads, a dead head (every query
    all on [CLS]), a uniform head and a head whose argmax jumps to random far keys."""
    ids = rng.choice(np.arange(1000, 5000), size=seq, replace=False)[None]
    ids[0, 0], ids[0, -1] = CLS, SEP
    tokens = [["[CLS]"] + [f"w{i}" for i in ids[0, 1:-1]] + ["[SEP]"]]
    local = 0.85 * np.eye(seq, k=-1) + 0.15 * np.eye(seq)
    local[0, 0] = 1.0
    heads = np.repeat(local[None], 5, axis=0)  # (H=5, T, T)
    heads[2] = 0.0
    heads[2, :, 0] = 1.0  # dead: everything on [CLS]
    heads[3] = 1.0 / seq  # uniform
    far = (np.arange(seq) + seq // 2) % seq  # argmax half the text away: never local
    heads[4] = 0.1 / seq
    heads[4, np.arange(seq), rng.permutation(far)] += 0.9
    return make_trace(heads[None, None], ids, tokens)


@pytest.mark.parametrize("seq", [16, 100])
def test_dead_uniform_and_jumping_heads_are_caught_short_and_long(rng, seq):
    # 16 tokens: the shortest text on which every kind gives a verdict (jumping's minimum).
    flagged = analysis.detect_anomalies(odd_heads_trace(rng, seq))
    found = set(zip(flagged["head"], flagged["kind"]))
    assert found == {(2, "over-concentrated"), (3, "over-dispersed"), (4, "jumping")}
    assert not flagged.attrs["too_short"]


def test_short_texts_get_too_short_not_a_flag(rng):
    # 8 tokens: under the minimum of over-concentrated (12) and jumping (16). The dead and
    # jumping heads are not flagged: their verdict is "too short", said in the result.
    every = analysis.detect_anomalies(odd_heads_trace(rng, 8), flagged_only=False)
    by_kind = every.set_index(["head", "kind"])
    for kind, minimum in (("over-concentrated", 12), ("jumping", 16)):
        rows = every[every["kind"] == kind]
        assert (rows["verdict"] == "too short").all() and not rows["flagged"].any()
        assert rows["score"].isna().all()
        assert f"needs at least {minimum}" in rows.iloc[0]["detail"] and "has 8 tokens" in rows.iloc[0]["detail"]
    # near-uniform attention is judged at any length: uniform is 1 whatever the keys
    assert by_kind.loc[(3, "over-dispersed"), "verdict"] == "flagged"
    flagged = analysis.detect_anomalies(odd_heads_trace(rng, 8))
    assert set(zip(flagged["head"], flagged["kind"])) == {(3, "over-dispersed")}
    assert set(flagged.attrs["too_short"]) == {"over-concentrated", "jumping"}
    # the minimum is a threshold like the others: lowered, the dead head is judged again
    lowered = analysis.detect_anomalies(odd_heads_trace(rng, 8), {"min_tokens_concentrated": 8})
    assert (2, "over-concentrated") in set(zip(lowered["head"], lowered["kind"]))


def test_a_corpus_is_judged_on_its_long_enough_texts(rng):
    # the 8-token text does not enter the concentrated / jump scores of the corpus
    short, long = odd_heads_trace(rng, 8), odd_heads_trace(rng, 40)
    alone = analysis.detect_anomalies(long, flagged_only=False).set_index(["head", "kind"])["score"]
    corpus = analysis.detect_anomalies([short, long], flagged_only=False).set_index(["head", "kind"])["score"]
    for kind in ("over-concentrated", "jumping"):
        np.testing.assert_allclose(corpus.xs(kind, level="kind"), alone.xs(kind, level="kind"))


# ---------------------------------------------------------------- comparisons


def test_compare_identical_and_swapped(rng):
    ids, tokens = repeated_sequence(rng)
    heads = known_heads()
    same = analysis.compare(make_trace(heads, ids, tokens), make_trace(heads, ids, tokens))
    assert np.allclose(same["jsd"], 0.0, atol=1e-6)
    assert not same["category_changed"].any()
    assert np.allclose(same["entropy_diff"], 0.0)
    swapped = heads[:, :, [1, 0, 2, 3, 4]]  # previous-token and [CLS] heads trade places
    diff = analysis.compare(make_trace(heads, ids, tokens), make_trace(swapped, ids, tokens)).set_index("head")
    assert diff["category_changed"].tolist() == [True, True, False, False, False]
    assert diff.loc[0, "category_b"] == "sink"
    # previous_token averages the SEQ - 1 queries that have one; the [CLS] head covers query 1
    assert diff.loc[0, "previous_token_diff"] == pytest.approx(-1.0 + 1 / (SEQ - 1))
    assert diff.loc[0, "jsd"] > 0.5
    with pytest.raises(ValueError, match="same shape"):
        analysis.compare(make_trace(heads, ids, tokens), make_trace(heads[:, :, :2], ids, tokens))
