"""The views inside a head and a block: head view, attention steps, query/key map, model structure.

Specs validate against the Vega-Lite schema and encode the fields they claim; the numbers
the step view shows equal the model's own scores and attention; AttentionViz's
normalisation keeps every dot product and each query's softmax; the summary's
parameter counts equal the checkpoint's tensors and its FLOPs equal a hand count.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnjax
from attnjax import Capture, viz
from attnjax.models import checkpoints, summary
from attnjax.viz.inside_frames import (
    DEFAULT_TOP_K,
    attention_step_frames,
    attentionviz_normalise,
    head_view_frames,
)

TEXT = "The cat sat on the mat. Then the cat saw a dog."


@pytest.fixture(scope="module")
def model():
    return attnjax.load("minilm")


@pytest.fixture(scope="module")
def trace(model):
    return attnjax.run(model, TEXT, capture=Capture(attention=True, scores=True, qkv=True))


def layers_of(spec):
    return spec.get("layer") or []


def test_head_view_spec_and_lines(trace):
    spec = viz.head_view(trace).to_dict(validate=True)
    names = {p["name"] for p in spec["params"]} | {p["name"] for layer in layers_of(spec) for p in layer.get("params", [])}
    assert {"head_view_layer", "head_view_head", "hover_query", "hover_key"} <= names
    rule = layers_of(spec)[0]
    assert rule["mark"]["type"] == "rule"
    encoding = rule["encoding"]
    assert encoding["opacity"]["field"] == "weight" and encoding["color"]["field"] == "head"
    assert {encoding[c]["field"] for c in ("y", "y2")} == {"q_row", "k_row"}
    lines, tokens, info = head_view_frames(trace)
    n = len(tokens)
    assert info["top_k"] is None and len(lines) == 6 * 12 * n * n  # BERT: every key visible, weight > 0
    one = lines[(lines.layer == 2) & (lines.head == 3) & (lines["query"] == 4)]
    np.testing.assert_allclose(one["weight"], np.asarray(trace.attention[2, 0, 3, 4])[one["key"]], rtol=1e-6)


def test_head_view_long_input_draws_top_k_and_says_so(model):
    long = attnjax.run(model, " ".join(["word"] * 40), capture=Capture(attention=True, layers=(1,)))
    chart = viz.head_view(long, layer=1, head=0)
    spec = chart.to_dict(validate=True)
    assert any(f"top {DEFAULT_TOP_K} keys" in line for line in spec["title"]["subtitle"])
    lines, _, info = head_view_frames(long, [1])
    per_query = lines.groupby(["head", "query"]).size()
    assert info["top_k"] == DEFAULT_TOP_K and per_query.min() >= DEFAULT_TOP_K
    assert per_query.max() <= 2 * DEFAULT_TOP_K  # only exact ties at the cut add lines


def test_attention_steps_match_the_model(trace):
    steps = attention_step_frames(trace, 2, 3, 5)
    keys = steps["keys"]
    np.testing.assert_allclose(keys["scaled"], np.asarray(trace.scores[2, 0, 3, 5])[keys["key"]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keys["weight"], np.asarray(trace.attention[2, 0, 3, 5])[keys["key"]], atol=1e-6)
    v = np.asarray(trace.values[2, 0, 3])[keys["key"]]                                 # (n, D)
    np.testing.assert_allclose(steps["output"]["value"], keys["weight"].to_numpy() @ v, rtol=1e-5, atol=1e-6)
    spec = viz.attention_steps(trace, 2, 3, 5).to_dict(validate=True)
    text = str(spec)
    for stage in ("1 \u00b7 q", "2 \u00b7 q\u00b7k", "3 \u00b7 scaled", "4 \u00b7 masked", "5 \u00b7 softmax",
                  "6 \u00b7 weighted sum of v"):
        assert stage in text, stage


def test_views_that_need_qkv_say_how_to_capture_it(model):
    plain = attnjax.run(model, "A dog.", capture=Capture(attention=True))
    for build in (lambda: viz.attention_steps(plain, 0, 0, 1), lambda: viz.qk_embedding(plain, 0, 0)):
        with pytest.raises(ValueError, match=r"Capture\(qkv=True\)"):
            build()
    with pytest.raises(ValueError, match="head=12 is out of range"):
        viz.attention_steps(attnjax.run(model, "A dog.", capture=Capture(qkv=True)), 0, 12, 1)


def test_attentionviz_normalisation_keeps_dot_products_and_softmax():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(7, 16)) + 3.0, 0.2 * rng.normal(size=(9, 16)) - 1.0       # unequal means and norms
    q_n, k_n, c = attentionviz_normalise(q, k)
    np.testing.assert_allclose(q_n.mean(0), c * q.mean(0))
    np.testing.assert_allclose(k_n.mean(0) * c, q.mean(0))                            # key mean moved to the query mean
    np.testing.assert_allclose(np.linalg.norm(q_n, axis=1).mean(), np.linalg.norm(k_n, axis=1).mean())
    softmax = lambda s: np.exp(s - s.max(1, keepdims=True)) / np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(softmax(q_n @ k_n.T), softmax(q @ k.T), rtol=1e-10)


def test_qk_embedding_spec(trace):
    spec = viz.qk_embedding(trace, 2, 3).to_dict(validate=True)
    dots = layers_of(spec)[1]
    assert dots["encoding"]["color"]["field"] == "kind"
    assert {t["field"] for t in dots["encoding"]["tooltip"]} >= {"token", "kind"}
    assert "Yeh et al. 2023" in " ".join(spec["title"]["subtitle"])
    every = viz.qk_embedding(trace, 2).to_dict(validate=True)
    assert any(p["name"] == "qk_head" and "bind" in p for p in every["params"])
    with pytest.raises(ValueError, match="method='umap'"):
        viz.qk_embedding(trace, 2, 3, method="umap")


def test_tsne_keeps_clusters_apart_and_is_reproducible():
    # Three tight clusters far apart in 16-D: t-SNE must keep each point's nearest
    # neighbours in its own cluster, and the same input and seed give the same picture.
    from attnjax.viz import embedding

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 16))
    points = np.concatenate([c + rng.normal(0, 0.5, (30, 16)) for c in centres])       # (90, 16)
    labels = np.repeat(np.arange(3), 30)
    coords = embedding.tsne_2d(points, seed=1)                                          # (90, 2)
    distances = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :5]
    assert np.all(labels[neighbours] == labels[:, None])
    np.testing.assert_array_equal(embedding.tsne_2d(points, seed=1), coords)
    # Each point's Gaussian bandwidth is bisected until its neighbour distribution has the
    # asked perplexity: exp(entropy in nats) = 30; the joint P is symmetric and sums to 1.
    squared = embedding._squared_distances(points)
    rows = embedding._conditional_affinities(squared, 30.0)
    assert np.all(np.diag(rows) == 0) and np.allclose(rows.sum(1), 1.0)
    entropy = -np.sum(np.where(rows > 0, rows * np.log(np.where(rows > 0, rows, 1.0)), 0.0), axis=1)
    np.testing.assert_allclose(np.exp(entropy), 30.0, rtol=1e-6)
    joint = embedding._joint_affinities(squared, 30.0)
    np.testing.assert_allclose(joint, joint.T)
    assert joint.sum() == pytest.approx(1.0)


def test_qk_embedding_with_tsne(trace):
    spec = viz.qk_embedding(trace, 2, 3, method="tsne").to_dict(validate=True)
    dots = layers_of(spec)[1]
    assert dots["encoding"]["x"]["title"] == "t-SNE 1"
    caption = " ".join(spec["title"]["subtitle"])
    assert "t-SNE (perplexity" in caption and "Yeh et al. 2023" in caption


def test_summary_counts_are_the_checkpoint_tensors(model):
    rows = summary(model)
    tensors = checkpoints.strip_prefix(checkpoints.read_tensors(checkpoints.bundled_path()), "bert")
    tensors = {k: v for k, v in tensors.items() if not checkpoints.ignored("bert", k)}
    params = rows[rows.kind == "param"]
    assert len(params) == len(tensors)
    for module, shape, count in zip(params["module"], params["shape"], params["params"]):
        path = tuple(module.split("/"))
        key = next(f"{checkpoints.hf_name(path)}.{leaf}" for leaf in checkpoints.leaf_candidates(path)
                   if f"{checkpoints.hf_name(path)}.{leaf}" in tensors)
        assert tensors[key].size == count, module
        assert sorted(tensors[key].shape) == sorted(eval(shape)), module  # torch Linear is (out, in)
    assert rows["params"].iloc[0] == sum(t.size for t in tensors.values())


def test_minilm_flops_per_token_by_hand(model):
    # MiniLM: D = 384, FFN I = 1536, 12 heads x 32 dims, at T = 128 keys. A multiply-add is
    # 2 FLOPs. Per token and block: q, k, v, o projections 4 x 2 x 384 x 384 = 1,179,648;
    # FFN 2 x 2 x 384 x 1536 = 2,359,296; attention q.k and weights.v 2 x 2 x 128 x 12 x 32
    # = 196,608. Block total 3,735,552; six blocks 22,413,312 (embeddings and pooler: 0).
    rows = summary(model, tokens=128).set_index("module")
    assert rows.loc["encoder/layer_0", "flops_per_token"] == 1_179_648 + 2_359_296 + 196_608 == 3_735_552
    assert rows.loc["encoder/layer_0/attention/self", "flops_per_token"] == 3 * 294_912 + 196_608
    assert rows.loc["encoder", "flops_per_token"] == 6 * 3_735_552
    assert rows.loc["minilm", "flops_per_token"] == 22_413_312
    assert summary(model, tokens=1).loc[lambda f: f.module == "encoder/layer_0", "flops_per_token"].item() \
        == 3_735_552 - 196_608 + 2 * 2 * 1 * 384


def test_model_structure_spec(model):
    spec = viz.model_structure(model).to_dict(validate=True)
    names = {p["name"] for p in spec["params"]}
    assert {"structure_depth", "structure_block"} <= names
    text = str(spec)
    assert "q\u00b7k\u1d40 \u00d7 scale" in text and "encoder/layer_0/attention/self/query/kernel" in text
