"""Parity of the Flax ports with transformers' PyTorch models, layer by layer.

Reference: transformers' BertModel / GPT2LMHeadModel, eval mode, eager attention,
float32, on tiny random configs that transformers builds and saves itself.
Tolerances: float32 with a handful of layers; attention probabilities agree to
~1e-6 and hidden states to ~1e-5 (LayerNorm divides by small variances, and XLA
and torch sum in different orders), so atol 2e-5 / rtol 1e-4 below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnjax
from attnjax import Capture
from tests.tiny_models import tiny_bert, tiny_gpt2

ATOL = 2e-5
RTOL = 1e-4


def as_torch(x, dtype=torch.long):
    return torch.tensor(np.asarray(x)).to(dtype)


def reference_outputs(hf_model, input_ids, mask, token_type_ids=None):
    kwargs = dict(input_ids=as_torch(input_ids), attention_mask=as_torch(mask),
                  output_attentions=True, output_hidden_states=True)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = as_torch(token_type_ids)
    with torch.no_grad():
        return hf_model(**kwargs)


def assert_close(ours, theirs, what, atol=ATOL):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=atol, rtol=RTOL, err_msg=what)


def random_batch(rng, vocab, batch, seq_len, lengths):
    input_ids = rng.integers(0, vocab, size=(batch, seq_len)).astype(np.int32)
    mask = np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]  # (B, T)
    return input_ids, mask


def compare_layers(trace, reference, mask, causal):
    seq_len = mask.shape[1]
    visible = mask[:, None, None, :] & (np.tril(np.ones((seq_len, seq_len), bool)) if causal else True)
    for layer, attention in enumerate(reference.attentions):
        assert_close(trace.attention[layer], attention, f"attention, layer {layer}")
        # Scores: HF does not return them, but at visible keys log p = s - logsumexp(s).
        scores = np.asarray(trace.scores[layer])  # (B, N, T, T)
        peak = scores.max(-1, keepdims=True)
        log_probs = scores - peak - np.log(np.exp(scores - peak).sum(-1, keepdims=True))
        where = np.broadcast_to(visible, scores.shape)
        np.testing.assert_allclose(log_probs[where], np.log(attention.numpy()[where]), atol=1e-4,
                                   err_msg=f"scores, layer {layer}")
    for layer in range(len(reference.hidden_states) - 1):
        assert_close(trace.hidden_states[layer], reference.hidden_states[layer], f"hidden state {layer}")


BERT_SHAPES = [
    dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48),
    dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=64),
    dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=1, intermediate_size=32, hidden_act="relu"),
]


@pytest.mark.parametrize("shape", BERT_SHAPES, ids=lambda s: f"D{s['hidden_size']}-N{s['num_attention_heads']}-L{s['num_hidden_layers']}")
def test_bert_matches_transformers(tmp_path, shape):
    hf_model = tiny_bert(tmp_path, **shape)
    model = attnjax.load(tmp_path)
    rng = np.random.default_rng(0)
    input_ids, mask = random_batch(rng, model.config.vocab_size, batch=3, seq_len=11, lengths=[11, 7, 3])
    token_type_ids = (np.arange(11)[None, :] >= np.array([[6], [4], [11]])).astype(np.int32)

    output, trace = model.forward(model.params, input_ids, mask, token_type_ids, capture=Capture.all())
    reference = reference_outputs(hf_model, input_ids, mask, token_type_ids)

    assert trace.attention.shape == (shape["num_hidden_layers"], 3, shape["num_attention_heads"], 11, 11)
    compare_layers(trace, reference, mask, causal=False)
    assert_close(trace.hidden_states[-1], reference.hidden_states[-1], "last hidden state")
    assert_close(output.last_hidden_state, reference.last_hidden_state, "last_hidden_state")
    assert_close(output.pooler_output, reference.pooler_output, "pooler_output")
    # Padded keys get exactly zero attention.
    padded_keys = np.broadcast_to(~mask[None, :, None, None, :], trace.attention.shape)
    assert np.all(np.asarray(trace.attention)[padded_keys] == 0.0)


GPT2_SHAPES = [
    dict(n_embd=32, n_head=4, n_layer=2),
    dict(n_embd=48, n_head=6, n_layer=3, activation_function="gelu"),
    dict(n_embd=32, n_head=2, n_layer=2, scale_attn_by_inverse_layer_idx=True),
]


@pytest.mark.parametrize("shape", GPT2_SHAPES, ids=lambda s: f"D{s['n_embd']}-N{s['n_head']}-L{s['n_layer']}")
def test_gpt2_matches_transformers(tmp_path, shape):
    hf_model = tiny_gpt2(tmp_path, with_tokenizer=False, **shape)
    model = attnjax.load(tmp_path)
    rng = np.random.default_rng(1)
    input_ids, mask = random_batch(rng, model.config.vocab_size, batch=3, seq_len=9, lengths=[9, 5, 2])

    output, trace = model.forward(model.params, input_ids, mask, capture=Capture.all())
    reference = reference_outputs(hf_model, input_ids, mask)

    compare_layers(trace, reference, mask, causal=True)
    # HF applies ln_f to its last hidden_states entry; ours keeps the raw residual stream.
    assert_close(output.last_hidden_state, reference.hidden_states[-1], "ln_f(last block)")
    # Logits at real (non-padding) positions; HF's padded rows see the same keys as ours.
    assert_close(np.asarray(output.logits)[mask], reference.logits.numpy()[mask], "logits", atol=1e-4)
    future = np.triu(np.ones((9, 9), bool), 1)
    assert np.all(np.asarray(trace.attention)[..., future] == 0.0)


def test_gpt2_right_padding_does_not_change_real_tokens(tmp_path):
    """A padded sequence's real positions equal the same sequence run alone."""
    tiny_gpt2(tmp_path, with_tokenizer=False)
    model = attnjax.load(tmp_path)
    ids = np.array([[5, 17, 42, 8, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0]], bool)
    padded, padded_trace = model.forward(model.params, ids, mask, capture=Capture(attention=True))
    alone, alone_trace = model.forward(model.params, ids[:, :4], capture=Capture(attention=True))
    assert_close(np.asarray(padded.logits)[:, :4], alone.logits, "logits")
    assert_close(np.asarray(padded_trace.attention)[..., :4, :4], alone_trace.attention, "attention")


def test_layer_norm_keeps_precision_when_activations_share_a_large_offset(tmp_path):
    # Residual streams often carry a large common offset (massive activations). A
    # one-pass variance E[x^2] - E[x]^2 then cancels catastrophically (offset 50 cost
    # ~1e-4 in the logits); the ports use the two-pass variance, as torch does.
    hf_model = tiny_gpt2(tmp_path, with_tokenizer=False)
    model = attnjax.load(tmp_path)
    rng = np.random.default_rng(3)
    embeds = (rng.normal(size=(1, 6, 32)) + 50.0).astype(np.float32)  # (B, T, D)
    ids = np.zeros((1, 6), np.int32)
    output, _ = model.forward(model.params, ids, inputs_embeds=embeds)
    with torch.no_grad():
        expected = hf_model(inputs_embeds=torch.tensor(embeds)).logits
    assert_close(output.logits, expected, "logits with offset inputs")
