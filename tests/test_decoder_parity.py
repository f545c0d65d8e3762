"""Parity of the Llama-like decoders with transformers' PyTorch models, layer by layer.

Reference: transformers' *ForCausalLM in eval mode with eager attention, float32, on
the tiny random configs of tests/tiny_decoders.py (each family with its options on:
GQA / MQA, llama3 and linear RoPE scaling, windows shorter than the sequence, Qwen2
biases, Qwen3 q/k norms, Gemma norms and embeddings, Gemma 2 soft-caps and alternating
windows, tied and untied heads), on right-padded batches. Hugging Face's padded query
rows attend to earlier real tokens, not to themselves, so only real positions are
compared. Tolerances as for GPT-2: atol 2e-5 / rtol 1e-4 (float32 over a few layers;
RMSNorm and XLA's summation order cost ~1e-5); the max errors seen are ~1e-5.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnjax
from attnjax import Capture, UnsupportedConfigError
from attnjax.models.llama import LlamaConfig
from attnjax.models.rope import RopeConfig, inverse_frequencies
from tests.tiny_decoders import DECODERS, tiny_decoder

ATOL = 2e-5
RTOL = 1e-4
LENGTHS = [12, 7, 3]  # right-padded batch of 3 in 12 positions; windows are 4 and 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (directory, torch model), each built and saved once per module."""
    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(name)
            cache[key] = directory, tiny_decoder(directory, name, **options)
        return cache[key]

    return get


def batch(vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab_size, size=(len(LENGTHS), max(LENGTHS))).astype(np.int32)
    mask = np.arange(max(LENGTHS))[None, :] < np.asarray(LENGTHS)[:, None]  # (B, T)
    return input_ids, mask


def reference(hf_model, input_ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(input_ids).long(), attention_mask=torch.tensor(mask).long(),
                        output_attentions=True, output_hidden_states=True)


def assert_close(ours, theirs, what, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                               atol=atol, rtol=rtol, err_msg=what)


def compare(output, trace, ref, mask):
    """Logits, attention, scores and hidden states at every real position."""
    assert_close(np.asarray(output.logits)[mask], ref.logits.numpy()[mask], "logits")
    for layer, attention in enumerate(ref.attentions):
        theirs = attention.numpy().transpose(0, 2, 1, 3)[mask]  # (real queries, H, T)
        ours = np.asarray(trace.attention[layer]).transpose(0, 2, 1, 3)[mask]
        assert_close(ours, theirs, f"attention, layer {layer}")
        # Scores (capped and scaled): HF returns none, but at visible keys
        # log p = s - logsumexp(s over visible keys).
        scores = np.asarray(trace.scores[layer], np.float64).transpose(0, 2, 1, 3)[mask]
        visible = theirs > 0
        peak = np.where(visible, scores, -np.inf).max(-1, keepdims=True)
        log_z = np.log(np.where(visible, np.exp(scores - peak), 0).sum(-1, keepdims=True)) + peak
        np.testing.assert_allclose((scores - log_z)[visible], np.log(theirs[visible]), atol=1e-4,
                                   err_msg=f"scores, layer {layer}")
    # HF's last hidden_states entry is the final norm of the last block (our last_hidden_state).
    for layer in range(len(ref.hidden_states) - 1):
        assert_close(np.asarray(trace.hidden_states[layer])[mask], ref.hidden_states[layer].numpy()[mask],
                     f"hidden state {layer}")
    assert_close(np.asarray(output.last_hidden_state)[mask], ref.hidden_states[-1].numpy()[mask],
                 "last_hidden_state")


@pytest.mark.parametrize("name", list(DECODERS))
def test_matches_transformers(built, name):
    directory, hf_model = built(name)
    model = attnjax.load(directory)
    config = model.config
    assert model.family == DECODERS[name][0] and model.causal
    input_ids, mask = batch(config.vocab_size)

    output, trace = model.forward(model.params, input_ids, mask, capture=Capture.all())
    ref = reference(hf_model, input_ids, mask)

    # One map per query head, grouped-query models included.
    assert trace.attention.shape == (config.num_layers, 3, config.num_heads, 12, 12)
    assert trace.causal and len(trace.hidden_states) == config.num_layers + 1
    compare(output, trace, ref, mask)
    # RoPE frequencies: float32 like transformers' buffer; torch's vectorised pow is not
    # correctly rounded, so an entry may differ by one ulp (6e-8 relative).
    ours = inverse_frequencies(config.rope, config.head_dim)
    theirs = hf_model.model.rotary_emb.inv_freq.numpy()
    assert np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64)).max() <= 1


@pytest.mark.parametrize("name", ["gemma2", "llama-mqa-linear-tied"])
def test_streaming_kernel_path_computes_the_same_model(built, name):
    """Without a captured matrix, attention runs in the blockwise kernel (GQA 4/2 with
    windows and soft-caps; MQA): same logits, statistics per query head in float32."""
    directory, hf_model = built(name)
    model = attnjax.load(directory)
    input_ids, mask = batch(model.config.vocab_size)
    output, trace = model.forward(model.params, input_ids, mask, capture=Capture(stats=True))
    assert_close(np.asarray(output.logits)[mask], reference(hf_model, input_ids, mask).logits.numpy()[mask],
                 "kernel-path logits")
    assert trace.stats.entropy.shape == (model.config.num_layers, 3, model.config.num_heads, 12)
    assert trace.stats.entropy.dtype == jnp.float32


def test_windows_and_softcaps_are_where_the_configs_put_them(built):
    """Mistral slides on every layer, Qwen2 from max_window_layers, Gemma 2 on even layers."""
    expectations = {"mistral-window": (5, 5), "qwen2-bias-window": (None, 4, 4), "gemma2": (4, None, 4),
                    "llama-gqa-llama3": (None, None)}
    for name, windows in expectations.items():
        model = attnjax.load(built(name)[0])
        assert model.config.windows == windows, name
    model = attnjax.load(built("mistral-window")[0])
    input_ids, mask = batch(model.config.vocab_size)
    _, trace = model.forward(model.params, input_ids, mask, capture=Capture(attention=True))
    query, key = np.indices((12, 12))
    outside = key <= query - 5  # HF's sliding_window_overlay: visible iff q - W < k <= q
    assert np.all(np.asarray(trace.attention)[..., outside] == 0.0)
    assert np.all(np.asarray(trace.attention)[:, 0, :, 4, :5] > 0.0)  # W keys, the query included
    gemma2 = attnjax.load(built("gemma2")[0]).config
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (2.0, 4.0)
    assert gemma2.attention_scale == 24 ** -0.5


def test_tied_and_untied_heads(built):
    from safetensors.numpy import load_file

    for name, tied in (("llama-mqa-linear-tied", True), ("llama-gqa-llama3", False), ("gemma", True)):
        directory, _ = built(name)
        keys = set(load_file(str(directory / "model.safetensors")))
        assert ("lm_head.weight" in keys) is not tied, name  # tied checkpoints lack the head
        model = attnjax.load(directory)
        assert model.config.tie_word_embeddings is tied and ("lm_head" in model.params) is not tied


def test_sharded_checkpoint(built):
    directory, hf_model = built("qwen3-qknorm", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    model = attnjax.load(directory)
    input_ids, mask = batch(model.config.vocab_size, seed=1)
    output, trace = model.forward(model.params, input_ids, mask, capture=Capture.all())
    compare(output, trace, reference(hf_model, input_ids, mask), mask)


def test_bfloat16_checkpoint_loads_in_float32(built):
    # The rounding happened when the file was written: the float32 model holding the
    # same rounded weights is the reference, at the float32 tolerances.
    directory, hf_model = built("gemma2", torch_dtype=torch.bfloat16)
    model = attnjax.load(directory)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(model.params))
    input_ids, mask = batch(model.config.vocab_size, seed=2)
    output, trace = model.forward(model.params, input_ids, mask, capture=Capture.all())
    compare(output, trace, reference(hf_model, input_ids, mask), mask)


def test_bfloat16_compute_is_as_close_as_transformers_own(built):
    """dtype="bfloat16": params and activations in bfloat16, statistics in float32.

    bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation),
    and these tiny models have peaked attention and logits up to ~10, so neither port
    matches float32 closely (both are ~0.1-0.4 off in the logits, ~0.01-0.07 in the
    attention). The check: ours is no further from the float32 reference than
    transformers' own bfloat16 model (eager; norms and softmax in float32 as here)
    within a factor 2, plus one bfloat16 ulp of the logit scale (2^-8 relative) or
    0.01 in probability, the slack for two bfloat16 ports rounding at different points.
    """
    directory, hf_model = built("gemma2")  # GQA, windows, soft-caps, sandwich norms
    model = attnjax.load(directory, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(model.params))
    input_ids, mask = batch(model.config.vocab_size, seed=3)
    # jit: bfloat16 ops compile slowly one by one on the CPU.
    output, trace = model.jit_forward(model.params, input_ids, mask, capture=Capture(attention=True))
    assert output.logits.dtype == jnp.bfloat16
    exact = reference(hf_model, input_ids, mask)
    hf_bf16 = reference(copy.deepcopy(hf_model).to(torch.bfloat16), input_ids, mask)

    def error(logits, attentions):
        """Max |difference| from the float32 reference at real positions: logits, attention."""
        logit_error = np.abs(np.asarray(logits, np.float32)[mask] - exact.logits.numpy()[mask]).max()
        attention_error = max(
            np.abs(np.asarray(ours, np.float32).transpose(0, 2, 1, 3)[mask]
                   - theirs.numpy().transpose(0, 2, 1, 3)[mask]).max()
            for ours, theirs in zip(attentions, exact.attentions))
        return logit_error, attention_error

    ours = error(output.logits, list(trace.attention))
    theirs = error(hf_bf16.logits.float(), [a.float() for a in hf_bf16.attentions])
    scale = np.abs(exact.logits.numpy()[mask]).max()
    assert ours[0] <= 2 * theirs[0] + 2 ** -8 * scale, ("logits", ours, theirs)
    assert ours[1] <= 2 * theirs[1] + 0.01, ("attention", ours, theirs)
    _, stats = model.jit_forward(model.params, input_ids, mask, capture=Capture(stats=True, pool=4))
    assert stats.stats.entropy.dtype == jnp.float32


def test_logits_last_and_none(built):
    directory, _ = built("mistral-window")
    model = attnjax.load(directory)
    input_ids, mask = batch(model.config.vocab_size)
    full, _ = model.forward(model.params, input_ids, mask)
    last, _ = model.forward(model.params, input_ids, mask, logits="last")
    none, trace = model.forward(model.params, input_ids, mask, logits="none", capture=Capture(attention=True))
    rows = np.asarray(full.logits)[np.arange(3), np.asarray(LENGTHS) - 1]  # (B, V) at the last real token
    assert last.logits.shape == (3, model.config.vocab_size)
    assert_close(last.logits, rows, "last-position logits")
    assert none.logits is None and trace.attention is not None
    with pytest.raises(ValueError, match="logits='every'; pass one of"):
        model.forward(model.params, input_ids, mask, logits="every")


def test_gemma_inputs_embeds_are_not_scaled(built):
    """transformers scales token embeddings by sqrt(hidden) in the embedding layer, so
    inputs_embeds pass unscaled; the tied head uses the unscaled table."""
    directory, hf_model = built("gemma")
    model = attnjax.load(directory)
    input_ids, mask = batch(model.config.vocab_size, seed=5)
    embeds = np.asarray(model.params["embed_tokens"]["embedding"])[input_ids]  # (B, T, D)
    output, _ = model.forward(model.params, input_ids, mask, inputs_embeds=embeds)
    with torch.no_grad():
        expected = hf_model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask).long()).logits
    assert_close(np.asarray(output.logits)[mask], expected.numpy()[mask], "logits from inputs_embeds")


def test_gpt2_logits_options(tmp_path):
    from tests.tiny_models import tiny_gpt2

    tiny_gpt2(tmp_path, with_tokenizer=False, tie_word_embeddings=False)
    model = attnjax.load(tmp_path)
    input_ids, mask = batch(model.config.vocab_size)
    full, _ = model.forward(model.params, input_ids, mask)
    last, _ = model.forward(model.params, input_ids, mask, logits="last")
    none, _ = model.forward(model.params, input_ids, mask, logits="none")
    assert_close(last.logits, np.asarray(full.logits)[np.arange(3), np.asarray(LENGTHS) - 1], "GPT-2 last logits")
    assert none.logits is None and none.last_hidden_state.shape == (3, 12, model.config.n_embd)


TEXT = "The quick brown fox jumps over the lazy dog."
MAPS = Capture(attention=True)  # what the report captures for a short text


@pytest.fixture(scope="module")
def llama_run(built):
    """A Llama model, its attnjax.run of TEXT, and the logits option of each forward call.

    The later runs here (and the report's) use the same text and capture, so they share
    compiled programs."""
    model = attnjax.load(built("llama-mqa-linear-tied")[0])
    asked = []
    original = model.jit_forward

    def recording(*args, **kwargs):
        asked.append(kwargs["logits"])
        return original(*args, **kwargs)

    model.jit_forward = recording
    return model, attnjax.run(model, TEXT, capture=MAPS), asked


def test_run_asks_only_for_what_it_needs(llama_run):
    model, trace, asked = llama_run
    assert asked[0] == "none"  # no output returned: no LM head computed
    output, _ = attnjax.run(model, TEXT, capture=MAPS, return_output=True, logits="last")
    assert asked[-1] == "last" and output.logits.shape == (1, model.config.vocab_size)


def test_tokenizer_bos_padding_and_display(llama_run, built):
    model, trace, _ = llama_run
    assert trace.causal and trace.tokens[0][0] == "<s>"  # the tokenizer.json post-processor adds BOS
    assert "".join(trace.tokens[0][1:]) == TEXT  # each id decoded on its own, as for GPT-2
    padded = attnjax.tokenize(model, [TEXT, "A cat"])
    assert padded.tokens[1][-1] == "<pad>" and padded.input_ids[1, -1] == model.tokenizer.pad_token_id
    qwen = attnjax.load(built("qwen3-qknorm")[0])
    tokens = attnjax.tokenize(qwen, [TEXT, "A cat"])
    assert tokens.tokens[0][0] == "The"  # Qwen adds no BOS; it pads with EOS
    assert tokens.input_ids[1, -1] == qwen.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="give qwen3 plain strings"):
        attnjax.tokenize(qwen, [("a", "b")])


def test_too_long_text_says_what_to_pass(built):
    model = attnjax.load(built("gemma")[0])
    with pytest.raises(ValueError, match=r"more than the model's 64 positions. Pass max_length=64"):
        attnjax.run(model, "The cat sat on the mat. " * 20)
    trace = attnjax.run(model, "The cat sat on the mat. " * 20, max_length=64, capture=Capture())
    assert trace.seq_len == 64
    with pytest.raises(ValueError, match="has 64 positions. Truncate it"):
        model.forward(model.params, np.ones((1, 65), np.int32))


def test_analyses_treat_position_zero_as_the_sink(llama_run):
    from attnjax import analysis

    model, trace, _ = llama_run
    scores = analysis.head_scores(trace)
    assert len(scores) == model.config.num_layers * model.config.num_heads
    # "<s>" is the decoder's BOS, not a [CLS]: as for GPT-2, cls and sep are NaN.
    assert scores["cls"].isna().all() and scores["sep"].isna().all()
    assert scores["first_token"].notna().all()


def hf_config(name, **changes):
    from tests.tiny_decoders import COMMON, CONFIG_CLASSES

    family, options = DECODERS[name]
    config = CONFIG_CLASSES[family](**dict(COMMON, **options)).to_dict()
    config.update(changes)
    return config


def test_legacy_rope_keys_and_gemma_gelu():
    """rope_theta + rope_scaling ("type" or "rope_type") read as v5's rope_parameters."""
    v5 = LlamaConfig.from_hf_config(hf_config("llama-mqa-linear-tied"))
    legacy = hf_config("llama-mqa-linear-tied", rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    del legacy["rope_parameters"]
    assert LlamaConfig.from_hf_config(legacy).rope == v5.rope == RopeConfig("linear", 5000.0, 2.0)
    llama3 = hf_config("llama-gqa-llama3", rope_theta=10000.0)
    llama3["rope_scaling"] = dict(llama3.pop("rope_parameters"), rope_type="llama3")
    del llama3["rope_scaling"]["rope_theta"]
    assert LlamaConfig.from_hf_config(llama3).rope == LlamaConfig.from_hf_config(hf_config("llama-gqa-llama3")).rope
    gemma = hf_config("gemma", hidden_act="gelu")
    assert LlamaConfig.from_hf_config(gemma).hidden_act == "gelu_pytorch_tanh"
    assert LlamaConfig.from_hf_config(hf_config("gemma2", hidden_activation="gelu")).hidden_act == "gelu"


def test_layer_types_and_window_rules():
    explicit = hf_config("gemma2", layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    assert LlamaConfig.from_hf_config(explicit).windows == (None, 4, 4)
    assert LlamaConfig.from_hf_config(hf_config("qwen2-bias-window", use_sliding_window=False, layer_types=None)).windows == (None,) * 3
    assert LlamaConfig.from_hf_config(hf_config("mistral-window", sliding_window=None)).windows == (None, None)


@pytest.mark.parametrize("name, changes, message", [
    ("llama-gqa-llama3", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                                   original_max_position_embeddings=32)), r"rope_type='yarn'"),
    ("llama-gqa-llama3", dict(rope_scaling=dict(type="dynamic", factor=2.0)), r"rope_type='dynamic'"),
    ("qwen2-bias-window", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), r"rope_type='longrope'"),
    ("llama-gqa-llama3", dict(mlp_bias=True), r"mlp_bias=True"),
    ("llama-gqa-llama3", dict(num_attention_heads=6, num_key_value_heads=4),
     r"num_attention_heads=6, not a multiple of num_key_value_heads=4"),
    ("mistral-window", dict(hidden_act="quick_gelu"), r"activation 'quick_gelu' \(config option hidden_act\)"),
    ("gemma2", dict(hidden_activation="relu6"), r"activation 'relu6' \(config option hidden_activation\)"),
    ("gemma2", dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), "chunked_attention"),
    ("qwen2-bias-window", dict(layer_types=["sliding_attention"] * 3, use_sliding_window=False), "no sliding window"),
    ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("llama-gqa-llama3", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
])
def test_unsupported_options_are_named(name, changes, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        LlamaConfig.from_hf_config(hf_config(name, **changes))


def test_unsupported_option_from_a_directory(built, tmp_path):
    directory, _ = built("mistral-window")
    for file in directory.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match="yarn"):
        attnjax.load(tmp_path)
    with pytest.raises(ValueError, match="dtype='float16'"):
        attnjax.load(directory, dtype="float16")


def test_report_on_a_decoder(llama_run, tmp_path):
    """The report runs on a Llama-like decoder as on GPT-2, next-token explorer included
    (from the last position's logits only)."""
    from attnjax.report import build_report

    model, _, asked = llama_run
    report = build_report(model, TEXT, progress=False)
    page = report.save(tmp_path / "llama.html").read_text()
    assert report.summary["family"] == "llama" and report.summary["heads"] == model.config.num_heads
    assert asked[-1] == "last" and '<h2 id="next-token">' in page
    assert "multi-query: 4 query heads share each" in page  # the run table says how heads are shared
