"""The bundled real checkpoint (all-MiniLM-L6-v2) against transformers' BertModel.

Reference: HF BertModel loaded from the same directory, eager attention, float32,
eval. Six real layers of width 384: attention agrees to ~1e-6 and hidden states to
~5e-6 absolute (measured), with rare elements of magnitude > 1 off by up to 4e-5
(2.6e-5 relative: LayerNorm over 384 features, summed in other orders). atol 3e-5
plus rtol 1e-4 covers that without hiding a wrong weight, which moves numbers by >1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import attnjax
from attnjax import Capture
from attnjax.models.checkpoints import bundled_path

TEXTS = [
    "The cat sat on the mat.",
    "Attention heads in BERT often look at [SEP], the previous token, or everywhere at once.",
    ("Where is the train station?", "It is two streets north of the museum."),
]


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


@pytest.fixture(scope="module")
def reference_model():
    return transformers.BertModel.from_pretrained(str(bundled_path()), attn_implementation="eager").eval()


def test_config_is_minilm(minilm):
    c = minilm.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (6, 12, 384)
    assert minilm.family == "bert" and c.add_pooling_layer


def test_parity_per_layer_with_a_pair_and_padding(minilm, reference_model):
    trace = attnjax.run(minilm, TEXTS, capture=Capture.all(), pad_to="exact")
    batch = attnjax.tokenize(minilm, TEXTS)
    with torch.no_grad():
        reference = reference_model(
            input_ids=torch.tensor(batch.input_ids).long(),
            attention_mask=torch.tensor(batch.attention_mask).long(),
            token_type_ids=torch.tensor(batch.token_type_ids).long(),
            output_attentions=True, output_hidden_states=True,
        )
    assert batch.token_type_ids[2].max() == 1, "the pair's second sentence has segment 1"
    for layer in range(6):
        np.testing.assert_allclose(trace.attention[layer], reference.attentions[layer].numpy(), atol=3e-5, rtol=1e-4,
                                   err_msg=f"attention layer {layer}")
    for layer in range(7):
        np.testing.assert_allclose(trace.hidden_states[layer], reference.hidden_states[layer].numpy(),
                                   atol=3e-5, rtol=1e-4, err_msg=f"hidden state {layer}")


def test_tokens_ride_along(minilm):
    trace = attnjax.run(minilm, TEXTS)
    assert trace.tokens[0][:3] == ("[CLS]", "the", "cat")
    assert trace.tokens[2].count("[SEP]") == 2
    assert len(trace.tokens[0]) == trace.seq_len
    assert trace.tokens[0][-1] == "[PAD]" and not bool(trace.mask[0, -1])


def test_empty_capture_output_matches(minilm, reference_model):
    """The default kernel path (no T x T kept) gives the same output as HF."""
    batch = attnjax.tokenize(minilm, TEXTS[:2])
    output, trace = minilm.jit_forward(minilm.params, batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                       capture=Capture())
    with torch.no_grad():
        reference = reference_model(input_ids=torch.tensor(batch.input_ids).long(),
                                    attention_mask=torch.tensor(batch.attention_mask).long())
    real = batch.attention_mask
    np.testing.assert_allclose(np.asarray(output.last_hidden_state)[real],
                               reference.last_hidden_state.numpy()[real], atol=3e-5, rtol=1e-4)
    assert trace.attention is None and trace.hidden_states is None and trace.stats is None
