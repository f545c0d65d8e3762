"""Checkpoint loading: round trips, strictness, and refusing what it must not load."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import attnjax
from attnjax import Capture, CheckpointError, UnsupportedConfigError
from tests.tiny_decoders import tiny_decoder
from tests.tiny_models import tiny_bert, tiny_gpt2


def forward_last(model, ids):
    output, _ = model.forward(model.params, ids)
    return np.asarray(getattr(output, "logits", getattr(output, "last_hidden_state", None)))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    tiny_bert(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tied (MQA) and an untied (GQA) Llama, saved as LlamaForCausalLM ('model.' keys)."""
    tied, untied = tmp_path_factory.mktemp("llama_tied"), tmp_path_factory.mktemp("llama_untied")
    tiny_decoder(tied, "llama-mqa-linear-tied", with_tokenizer=False)
    tiny_decoder(untied, "llama-gqa-llama3", with_tokenizer=False)
    return tied, untied


def copy_with(directory, tmp_path, *, tensors=None, config=None):
    """A copy of a checkpoint directory with its tensors or config replaced."""
    for file in directory.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            (tmp_path / file.name).write_bytes(file.read_bytes())
    original = load_file(str(directory / "model.safetensors"))
    save_file(tensors(original) if tensors else original, str(tmp_path / "model.safetensors"))
    hf_config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config(hf_config) if config else hf_config))
    return tmp_path


def test_round_trip_gpt2_tied_embeddings(tmp_path):
    """save_pretrained -> attnjax.load gives the same logits; lm_head is tied to wte."""
    hf_model = tiny_gpt2(tmp_path)
    model = attnjax.load(tmp_path)
    assert model.family == "gpt2" and model.tokenizer is not None
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(forward_last(model, ids), expected, atol=2e-5, rtol=1e-4)
    # Conv1D layout: c_attn's kernel is (in, 3 * out), as in the checkpoint, untransposed.
    assert model.params["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 96)


def test_round_trip_gpt2_untied_head(tmp_path):
    hf_model = tiny_gpt2(tmp_path, with_tokenizer=False, tie_word_embeddings=False)
    model = attnjax.load(tmp_path)
    assert not model.config.tie_word_embeddings
    ids = np.array([[7, 8, 9]], np.int32)
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(forward_last(model, ids), expected, atol=2e-5, rtol=1e-4)


def test_gpt2_task_prefix_and_mask_buffers_are_handled(gpt2_dir, tmp_path):
    """Old GPT-2 checkpoints carry 'h.N.attn.bias' causal-mask buffers: skipped, not loaded."""
    def add_buffers(tensors):
        tensors = dict(tensors)
        tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
        return tensors
    model = attnjax.load(copy_with(gpt2_dir, tmp_path, tensors=add_buffers))
    reference = attnjax.load(gpt2_dir)
    ids = np.array([[1, 2, 3]], np.int32)
    np.testing.assert_array_equal(forward_last(model, ids), forward_last(reference, ids))


def test_bert_legacy_gamma_beta_names(bert_dir, tmp_path):
    """Old BERT checkpoints name LayerNorm weights gamma/beta; same numbers."""
    def rename(tensors):
        return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in tensors.items()}
    legacy = attnjax.load(copy_with(bert_dir, tmp_path, tensors=rename))
    modern = attnjax.load(bert_dir)
    ids = np.array([[1, 2, 3, 4]], np.int32)
    np.testing.assert_array_equal(forward_last(legacy, ids), forward_last(modern, ids))


def test_bert_with_task_prefix_and_head(bert_dir, tmp_path):
    """BertForMaskedLM-style files: 'bert.' prefix and a 'cls.' head the port does not use."""
    def prefix(tensors):
        out = {f"bert.{k}": v for k, v in tensors.items()}
        out["cls.predictions.bias"] = np.zeros(120, np.float32)
        return out
    model = attnjax.load(copy_with(bert_dir, tmp_path, tensors=prefix))
    ids = np.array([[5, 6, 7]], np.int32)
    np.testing.assert_array_equal(forward_last(model, ids), forward_last(attnjax.load(bert_dir), ids))


def test_missing_key_is_named(bert_dir, tmp_path):
    def drop(tensors):
        return {k: v for k, v in tensors.items() if k != "encoder.layer.1.attention.self.key.weight"}
    with pytest.raises(CheckpointError, match=r"missing weight 'encoder\.layer\.1\.attention\.self\.key\.weight'"):
        attnjax.load(copy_with(bert_dir, tmp_path, tensors=drop))


def test_unexpected_key_is_named(bert_dir, tmp_path):
    def extra(tensors):
        return dict(tensors, **{"encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected weight 'encoder\.layer\.0\.attention\.self\.rotary\.weight'"):
        attnjax.load(copy_with(bert_dir, tmp_path, tensors=extra))


def test_wrong_shape_is_named(gpt2_dir, tmp_path):
    def shrink(tensors):
        return dict(tensors, **{"transformer.wpe.weight": tensors["transformer.wpe.weight"][:10]})
    with pytest.raises(CheckpointError, match=r"'wpe\.weight' has shape \(10, 32\).*\(64, 32\)"):
        attnjax.load(copy_with(gpt2_dir, tmp_path, tensors=shrink))


def test_nan_weight_is_refused(bert_dir, tmp_path):
    def poison(tensors):
        bad = tensors["pooler.dense.bias"].copy()
        bad[0] = np.nan
        return dict(tensors, **{"pooler.dense.bias": bad})
    with pytest.raises(CheckpointError, match=r"'pooler\.dense\.bias' holds NaN"):
        attnjax.load(copy_with(bert_dir, tmp_path, tensors=poison))


def test_config_that_does_not_match_weights(bert_dir, tmp_path):
    with pytest.raises(CheckpointError, match="shape"):
        attnjax.load(copy_with(bert_dir, tmp_path, config=lambda c: dict(c, intermediate_size=40)))


@pytest.mark.parametrize("option, value", [
    ("position_embedding_type", "relative_key"),
    ("is_decoder", True),
])
def test_unsupported_bert_option(bert_dir, tmp_path, option, value):
    with pytest.raises(UnsupportedConfigError, match=f"{option}={value!r}"):
        attnjax.load(copy_with(bert_dir, tmp_path, config=lambda c: dict(c, **{option: value})))


def test_unsupported_activation(gpt2_dir, tmp_path):
    with pytest.raises(UnsupportedConfigError, match=r"activation 'quick_gelu'.*activation_function"):
        attnjax.load(copy_with(gpt2_dir, tmp_path, config=lambda c: dict(c, activation_function="quick_gelu")))


def test_unsupported_model_type(bert_dir, tmp_path):
    with pytest.raises(CheckpointError, match="model_type='t5'; attnjax ports 'bert', 'gpt2', 'llama'"):
        attnjax.load(copy_with(bert_dir, tmp_path, config=lambda c: dict(c, model_type="t5")))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 8}))
    marker = tmp_path / "pwned"
    # A pickle that would create a file if it were ever unpickled.
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="pickle.*arbitrary code"):
        attnjax.load(tmp_path)
    assert not marker.exists()


def test_missing_and_corrupt_safetensors(bert_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((bert_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        attnjax.load(tmp_path)
    data = (bert_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        attnjax.load(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        attnjax.load(tmp_path)


def test_unknown_name_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        attnjax.load("no-such-org/no-such-model")
    with pytest.raises(CheckpointError, match="Unknown model"):
        attnjax.load("./definitely/not/here")


def test_layers_selection(gpt2_dir):
    model = attnjax.load(gpt2_dir)
    ids = np.array([[1, 2, 3]], np.int32)
    _, full = model.forward(model.params, ids, capture=Capture(attention=True))
    _, one = model.forward(model.params, ids, capture=Capture(attention=True, layers=(1,)))
    assert one.layers == (1,) and one.attention.shape[0] == 1
    # Equal up to float32 rounding (the two captures run differently fused programs);
    # another layer's map would differ by O(0.1).
    np.testing.assert_allclose(one.attention[0], full.attention[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="names layer 5, but the model has 2 layers"):
        model.forward(model.params, ids, capture=Capture(attention=True, layers=(5,)))


def test_half_precision_checkpoints_load_in_float32(tmp_path):
    # Many hub checkpoints are bfloat16 or float16: upcast to float32, same numbers as
    # the model upcast in torch (the rounding happened when the file was written).
    hf_model = tiny_bert(tmp_path / "src")
    ids = np.array([[1, 2, 3, 4]], np.int32)
    for dtype in (torch.bfloat16, torch.float16):
        directory = tmp_path / str(dtype).split(".")[-1]
        hf_model.to(dtype).save_pretrained(directory)
        model = attnjax.load(directory)
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(model.params))
        with torch.no_grad():
            expected = hf_model.to(torch.float32)(input_ids=torch.tensor(ids).long()).last_hidden_state
        np.testing.assert_allclose(forward_last(model, ids), expected.numpy(), atol=2e-5, rtol=1e-4)


def test_legacy_names_only_for_layer_norms(bert_dir, tmp_path):
    def rename(tensors):
        return {k.replace("attention.self.query.bias", "attention.self.query.beta"): v for k, v in tensors.items()}
    with pytest.raises(CheckpointError, match=r"missing weight 'encoder\.layer\.0\.attention\.self\.query\.bias'"):
        attnjax.load(copy_with(bert_dir, tmp_path, tensors=rename))


def sharded(directory, tmp_path, index_text):
    """A copy of ``directory`` whose weights sit in one shard behind the given index."""
    tmp_path.mkdir()
    for file in directory.iterdir():
        if file.name != "model.safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    (tmp_path / "model.safetensors.index.json").write_text(index_text)
    return tmp_path


def test_sharded_checkpoint_and_bad_indexes(bert_dir, tmp_path):
    keys = load_file(str(bert_dir / "model.safetensors"))
    good = json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}})
    model = attnjax.load(sharded(bert_dir, tmp_path / "good", good))
    ids = np.array([[3, 4, 5]], np.int32)
    np.testing.assert_array_equal(forward_last(model, ids), forward_last(attnjax.load(bert_dir), ids))
    for name, text, match in (("corrupt", "{not json", "is not a safetensors index"),
                              ("no_map", "{}", "is not a safetensors index"),
                              ("outside", json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}),
                               "must be .safetensors files in")):
        with pytest.raises(CheckpointError, match=match):
            attnjax.load(sharded(bert_dir, tmp_path / name, text))


@pytest.mark.parametrize("config, match", [
    (lambda c: [c], "holds a JSON list"),
    (lambda c: dict(c, num_attention_heads=0), "num_attention_heads=0; it must be a positive integer"),
    (lambda c: dict(c, num_attention_heads="4"), "num_attention_heads='4'; it must be a positive integer"),
])
def test_malformed_config_is_named(bert_dir, tmp_path, config, match):
    with pytest.raises((CheckpointError, UnsupportedConfigError), match=match):
        attnjax.load(copy_with(bert_dir, tmp_path, config=config))


def test_corrupt_tokenizer_is_a_checkpoint_error(gpt2_dir, tmp_path):
    directory = copy_with(gpt2_dir, tmp_path)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer files .* could not be read"):
        attnjax.load(directory)


def test_gpt2_without_a_usable_eos_id_still_pads(tmp_path):
    # The padding id only has to exist in the vocabulary: it is masked.
    tiny_gpt2(tmp_path, eos_token_id=None, bos_token_id=None)
    model = attnjax.load(tmp_path)
    trace = attnjax.run(model, ["The quick brown fox", "A cat"])
    assert trace.batch_size == 2 and not np.asarray(trace.mask)[1].all()


def subdir(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def test_decoder_rope_buffers_and_task_prefix(llama_dirs, tmp_path):
    """Old checkpoints carry rotary_emb.inv_freq buffers: skipped (attnjax computes the
    frequencies from config.json); a bare LlamaModel file (no 'model.' prefix) loads too."""
    tied, _ = llama_dirs
    def add_buffers(tensors):
        return dict(tensors, **{"model.rotary_emb.inv_freq": np.ones(4, np.float32),
                                "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    ids = np.array([[1, 2, 3]], np.int32)
    expected = forward_last(attnjax.load(tied), ids)
    np.testing.assert_array_equal(forward_last(attnjax.load(copy_with(tied, subdir(tmp_path, "a"), tensors=add_buffers)), ids),
                                  expected)
    bare = {key.removeprefix("model."): value for key, value in load_file(str(tied / "model.safetensors")).items()}
    np.testing.assert_array_equal(forward_last(attnjax.load(copy_with(tied, subdir(tmp_path, "b"), tensors=lambda t: bare)), ids),
                                  expected)


def test_decoder_tied_head_copy_must_equal_the_embeddings(llama_dirs, tmp_path):
    tied, _ = llama_dirs
    def with_head(tensors, offset):
        return dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"] + offset})
    attnjax.load(copy_with(tied, subdir(tmp_path, "same"), tensors=lambda t: with_head(t, 0.0)))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from embed_tokens.weight"):
        attnjax.load(copy_with(tied, subdir(tmp_path, "other"), tensors=lambda t: with_head(t, 1.0)))


@pytest.mark.parametrize("edit, match", [
    (lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}, r"missing weight 'lm_head\.weight'"),
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.weight"},
     r"missing weight 'layers\.1\.self_attn\.k_proj\.weight'"),
    (lambda t: dict(t, **{"model.layers.0.mlp.gate_proj.bias": np.zeros(48, np.float32)}),
     r"unexpected weight 'layers\.0\.mlp\.gate_proj\.bias'"),
    (lambda t: dict(t, **{"model.layers.0.self_attn.k_proj.weight": t["model.layers.0.self_attn.k_proj.weight"][:16]}),
     r"'layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\).*\(32, 64\)"),
    (lambda t: dict(t, **{"model.norm.weight": np.full_like(t["model.norm.weight"], np.inf)}),
     r"'norm\.weight' holds NaN or inf"),
])
def test_decoder_loading_is_strict(llama_dirs, tmp_path, edit, match):
    _, untied = llama_dirs
    with pytest.raises(CheckpointError, match=match):
        attnjax.load(copy_with(untied, tmp_path, tensors=edit))


def test_decoder_dtype_option(llama_dirs, gpt2_dir):
    tied, _ = llama_dirs
    model = attnjax.load(tied, dtype=jax.numpy.bfloat16)
    assert model.config.dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jax.numpy.dtype("bfloat16")}
    with pytest.raises(ValueError, match="gpt2 checkpoints load in float32 only"):
        attnjax.load(gpt2_dir, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"dtype='int8'; pass None \(float32\) or one of"):
        attnjax.load(tied, dtype="int8")
