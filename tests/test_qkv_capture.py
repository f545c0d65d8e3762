"""Capture(qkv=True): queries, keys and values of every recorded layer, in every family.

What must hold, by definition of the scores (attnjax/kernels/reference.py):
scale * q_i . k_j == Trace.scores[i, j] wherever key j is visible to query i, and
for Gemma 2's soft-capped layers c * tanh(scale * q.k / c) == Trace.scores there (the
recorded scores are the capped ones). Decoders record q and k after RoPE, so the
identity holds with the positions already rotated in; under GQA query head h reads kv
head h // (H // H_kv), and Trace.keys / values keep H_kv heads.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnjax
from attnjax import Capture
from tests.tiny_decoders import tiny_decoder
from tests.tiny_models import tiny_gpt2

CAPTURE = Capture(qkv=True, scores=True, attention=True)
IDS = np.array([[3, 17, 42, 8, 99, 5, 61, 7], [11, 4, 23, 77, 2, 9, 0, 0]])      # (B, T)
MASK = np.array([[1] * 8, [1] * 6 + [0, 0]], dtype=bool)                          # second row padded
TINY = ["llama-gqa-llama3", "llama-mqa-linear-tied", "mistral-window", "qwen2-bias-window", "qwen3-qknorm", "gemma",
        "gemma2"]  # every Llama-like family, GQA and MQA, windows, q/k norms, soft-caps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    found = {"minilm": attnjax.load("minilm")}
    gpt2 = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(gpt2, with_tokenizer=False)
    found["gpt2"] = attnjax.load(str(gpt2))
    for name in TINY:
        directory = tmp_path_factory.mktemp(name)
        tiny_decoder(directory, name, with_tokenizer=False)
        found[name] = attnjax.load(str(directory))
    return found


def visible(trace, layer_index: int) -> np.ndarray:
    """(B, 1, T, T) bool: key padding, causal and the layer's window."""
    mask = np.asarray(trace.mask)                                                # (B, T)
    seq = mask.shape[1]
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = np.ones((seq, seq), bool)
    if trace.causal:
        allowed &= j <= i
    window = trace.windows[layer_index] if trace.windows else None
    if window is not None:
        allowed &= j > i - window
    return mask[:, None, None, :] & allowed[None, None]


@pytest.mark.parametrize("name", ["minilm", "gpt2"] + TINY)
def test_scaled_dot_products_are_the_scores(models, name):
    model = models[name]
    _, trace = model.forward(model.params, IDS, MASK, capture=CAPTURE)
    config = model.config
    kv_heads = getattr(config, "num_kv_heads", config.num_heads)
    n_layers, batch, seq = config.num_layers, 2, 8
    assert trace.queries.shape == (n_layers, batch, config.num_heads, seq, config.head_dim)
    assert trace.keys.shape == (n_layers, batch, kv_heads, seq, config.head_dim)
    assert trace.values.shape == trace.keys.shape
    assert len(trace.scales) == len(trace.softcaps) == n_layers
    group = config.num_heads // kv_heads
    for index in range(n_layers):
        q = np.asarray(trace.queries[index], np.float64)                         # (B, H, T, D)
        k = np.repeat(np.asarray(trace.keys[index], np.float64), group, axis=1)  # (B, H, T, D)
        logits = np.einsum("bhqd,bhkd->bhqk", q, k) * trace.scales[index]       # (B, H, T, T)
        cap = trace.softcaps[index]
        if cap is not None:
            logits = cap * np.tanh(logits / cap)
        seen = np.broadcast_to(visible(trace, index), logits.shape)
        # float32 scores vs a float64 product of the float32 vectors: rounding only.
        np.testing.assert_allclose(np.asarray(trace.scores[index])[seen], logits[seen], rtol=1e-5, atol=1e-5)
    if name == "gemma2":
        assert trace.softcaps == (2.0,) * n_layers and trace.scales[0] == pytest.approx(24 ** -0.5)
    if name == "gpt2":
        assert trace.scales[0] == pytest.approx(config.head_dim ** -0.5)


def test_select_keeps_qkv_and_scales(models):
    model = models["llama-gqa-llama3"]
    _, trace = model.forward(model.params, IDS, MASK, capture=Capture(qkv=True, layers=(0, 1)))
    picked = trace.select(layers=(1,), sequences=(1,))
    assert picked.queries.shape == (1, 1, 4, 8, model.config.head_dim)
    assert picked.keys.shape == (1, 1, 2, 8, model.config.head_dim)             # GQA: 2 kv heads
    np.testing.assert_array_equal(picked.values[0, 0], trace.values[1, 1])
    assert picked.scales == trace.scales[1:] and picked.layers == (1,)
    assert trace.attention is None and trace.scores is None                      # qkv alone builds no T x T map


def test_step_view_numbers_under_soft_cap_window_and_gqa(models):
    # Gemma 2 (tiny): soft-cap 2, window 4 on layer 0, 4 query heads over 2 kv heads.
    from attnjax.viz.inside_frames import attention_step_frames, head_view_frames

    model = models["gemma2"]
    _, trace = model.forward(model.params, IDS, MASK, capture=CAPTURE)
    steps = attention_step_frames(trace, 0, 3, 5, sequence=1)
    keys = steps["keys"]
    assert steps["info"]["kv_head"] == 1 and list(keys["key"]) == list(range(6))   # padding left out
    assert list(keys["visible"]) == [False, False, True, True, True, True]          # window 4: keys 2..5
    scores = np.asarray(trace.scores[0, 1, 3, 5])[:6]
    np.testing.assert_allclose(keys["capped"][keys["visible"]], scores[keys["visible"].to_numpy()], rtol=1e-5, atol=1e-5)
    assert keys["masked"][~keys["visible"]].isna().all()
    np.testing.assert_allclose(keys["weight"], np.asarray(trace.attention[0, 1, 3, 5])[:6], atol=1e-6)
    lines, tokens, info = head_view_frames(trace, [1], sequence=0)                   # layer 1: full causal
    assert info["top_k"] is None and (lines["key"] <= lines["query"]).all()
    assert len(lines) == 4 * 8 * 9 // 2                                              # 4 heads x the causal triangle
