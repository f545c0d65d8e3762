"""attnjax.generate against transformers' generate, on tiny random decoders.

Every model has 32 positions, so prompts of at most 16 tokens and generations that end
within 32 positions share one compiled prefill (16 positions) and one decode step over
a 32-slot cache per model; one case fills the cache and the model's positions exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

import attnjax
from attnjax import Capture
from attnjax.chat import render_chat
from attnjax.generate import Generation, choose_token, generate
from tests.tiny_decoders import tiny_decoder
from tests.tiny_models import tiny_gpt2

POSITIONS = 32
PROMPTS = ["The quick brown fox", "A cat sat on the mat; the mat", "Heads look at"]
ROWS = Capture(attention=True)
# Each port against the option that matters in a cached step: GPT-2's learned positions
# (weights drawn wide enough that greedy text does not repeat one token), Mistral's
# 5-key window on every layer (prompt + new tokens run far past it), Gemma 2's soft-caps
# with alternating 4-key windows. (Qwen2 is the chat template's model below.)
BUILDERS = {
    "gpt2": lambda path: tiny_gpt2(path, seed=1, n_positions=POSITIONS, initializer_range=0.5),
    "mistral-window": lambda path: tiny_decoder(path, "mistral-window", max_position_embeddings=POSITIONS),
    "gemma2": lambda path: tiny_decoder(path, "gemma2", max_position_embeddings=POSITIONS),
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    """(attnjax model, transformers model) of one tiny decoder."""
    path = tmp_path_factory.mktemp(request.param)
    torch_model = BUILDERS[request.param](path)
    return attnjax.load(path), torch_model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2-sampling")
    BUILDERS["gpt2"](path)
    return attnjax.load(path)


def full_rows(model, ids: np.ndarray, capture: Capture):
    """A plain forward over ids, padded to the model's positions (one compile per model)."""
    padded = np.zeros((1, POSITIONS), np.int32)
    padded[0, :len(ids)] = ids
    mask = np.arange(POSITIONS)[None] < len(ids)
    _, trace = model.jit_forward(model.params, padded, mask, capture=capture)
    return trace


def test_greedy_equals_transformers_and_rows_equal_a_full_forward(pair):
    """Token for token as transformers' greedy generate (its eager float32 model), for
    several prompts, one of which fills all 32 positions (the cache's last slot); the
    rows recorded step by step equal a full forward's rows at every position."""
    model, torch_model = pair
    for index, text in enumerate(PROMPTS):
        ids = np.asarray(model.tokenizer(text)["input_ids"], np.int32)
        new = POSITIONS - len(ids) if index == 0 else 16
        generation = generate(model, text, max_new_tokens=new, capture=ROWS)
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor(ids[None].astype(np.int64)), max_new_tokens=new,
                                            do_sample=False)[0].numpy()
        np.testing.assert_array_equal(generation.ids, expected, err_msg=f"prompt {text!r}")
        assert generation.prompt_length == len(ids)
        assert generation.logits.shape == (generation.steps, model.config.vocab_size)
        np.testing.assert_array_equal(generation.logits.argmax(-1), generation.new_ids)
        total = len(generation.ids)
        assert generation.trace.attention.shape == (model.config.num_layers, 1, model.config.num_heads, total, total)
        reference = full_rows(model, generation.ids, ROWS)
        # Same float32 arithmetic over a different number of keys (the cache's 32 slots
        # against the padded forward's): summation order differs, so 1e-5, not bitwise.
        np.testing.assert_allclose(np.asarray(generation.trace.attention),
                                   np.asarray(reference.attention)[..., :total, :total], atol=1e-5)
        if index == 0:
            assert total == POSITIONS and generation.stop_reason in ("length", "eos")


def test_streaming_statistics_per_step_equal_a_full_forward(gpt2):
    """Capture(stats=True): each step's statistics, at its own position (self, previous,
    distance), and the column sums added up over the steps, equal the statistics a full
    forward over the same ids reads off its matrices (kernels.reference_stats)."""
    generation = generate(gpt2, PROMPTS[0], max_new_tokens=10, capture=Capture(stats=True))
    total = len(generation.ids)
    assert generation.trace.attention is None
    reference = full_rows(gpt2, generation.ids, Capture(attention=True, stats=True)).stats
    for name in ("lse", "entropy", "max_prob", "first_mass", "self_mass", "prev_mass", "mean_distance",
                 "received"):
        got = np.asarray(getattr(generation.trace.stats, name))
        np.testing.assert_allclose(got, np.asarray(getattr(reference, name))[..., :total], atol=2e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(generation.trace.stats.argmax),
                                  np.asarray(reference.argmax)[..., :total])


def test_sampling_is_reproducible_and_respects_top_k_and_top_p(gpt2):
    """The same seed gives the same tokens, another seed other tokens; every sampled
    token lies within the top k of its step's logits, or within the nucleus (the
    smallest most-likely set reaching top_p at that temperature)."""
    options = dict(max_new_tokens=12, temperature=1.5, capture=ROWS)
    first = generate(gpt2, PROMPTS[1], seed=3, **options)
    assert np.array_equal(first.ids, generate(gpt2, PROMPTS[1], seed=3, **options).ids)
    assert not np.array_equal(first.ids, generate(gpt2, PROMPTS[1], seed=4, **options).ids)

    top_k = generate(gpt2, PROMPTS[1], seed=5, top_k=3, **options)
    for logits, token in zip(top_k.logits, top_k.new_ids):
        assert logits[token] >= np.sort(logits)[-3], "a token outside the top 3"

    top_p = generate(gpt2, PROMPTS[1], seed=6, top_p=0.5, **options)
    for logits, token in zip(top_p.logits, top_p.new_ids):
        probs = np.exp(logits / 1.5 - np.logaddexp.reduce(logits / 1.5))
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1]
        assert token in keep, "a token outside the 0.5 nucleus"


def test_choose_token_filters():
    """Known answers: greedy takes the first maximum; top_k=1 and a tiny top_p leave only
    the argmax at any temperature."""
    choose = jax.jit(choose_token)
    logits = jax.numpy.asarray([1.0, 3.0, 3.0, -2.0])
    key = jax.random.PRNGKey(0)
    assert int(choose(logits, key, 0.0, 0, 1.0)) == 1
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        assert int(choose(logits, key, 5.0, 1, 1.0)) in (1, 2)  # ties with the 1st are kept
        assert int(choose(jax.numpy.asarray([0.0, 4.0, 1.0]), key, 2.0, 0, 0.01)) == 1


def test_stops_at_eos_and_at_a_stop_string(gpt2):
    greedy = generate(gpt2, PROMPTS[0], max_new_tokens=8, capture=ROWS)
    assert greedy.stop_reason == "length" and greedy.steps == 8
    with_eos = dataclasses.replace(gpt2, eos_token_ids=(int(greedy.new_ids[2]),))
    stopped = generate(with_eos, PROMPTS[0], max_new_tokens=8, capture=ROWS)
    first = list(greedy.new_ids).index(greedy.new_ids[2])
    assert stopped.stop_reason == "eos" and list(stopped.new_ids) == list(greedy.new_ids[:first + 1])
    assert stopped.trace.attention.shape[-1] == len(stopped.ids)
    stop = gpt2.tokenizer.decode(greedy.new_ids[:3])[-2:]
    by_string = generate(gpt2, PROMPTS[0], max_new_tokens=8, stop=stop)
    assert by_string.stop_reason == "stop" and stop in by_string.text and by_string.steps <= 3
    assert by_string.trace is None


def test_prompt_as_ids_and_clear_errors(gpt2):
    ids = gpt2.tokenizer(PROMPTS[2])["input_ids"]
    generation = generate(gpt2, ids, max_new_tokens=12, capture=ROWS)  # 17+ positions: the shared 32-slot cache
    assert isinstance(generation, Generation) and generation.prompt_text is None
    assert generation.tokens[:len(ids)] == tuple(gpt2.tokenizer.decode([i]) for i in ids)
    fits = POSITIONS - len(ids)
    with pytest.raises(ValueError, match=f"has {len(ids)} tokens and max_new_tokens={fits + 1}.*at most "
                                         f"max_new_tokens={fits} fit"):
        generate(gpt2, ids, max_new_tokens=fits + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(gpt2, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(gpt2, ids, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(gpt2, ids, max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(gpt2, [1, 10_000], max_new_tokens=2)
    with pytest.raises(ValueError, match="pooled"):
        generate(gpt2, ids, max_new_tokens=2, capture=Capture(stats=True, pool=4))
    with pytest.raises(ValueError, match="no chat template"):
        generate(gpt2, [{"role": "user", "content": "Hi"}], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a decoder"):
        generate(attnjax.load("minilm"), "The cat sat.", max_new_tokens=2)


def test_chat_template_renders_and_encodes_as_transformers(tmp_path):
    """render_chat and the ids generate feeds the model equal apply_chat_template's, for
    a template read from chat_template.jinja and one from tokenizer_config.json."""
    tiny_decoder(tmp_path, "qwen2-bias-window", max_position_embeddings=POSITIONS)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "The quick brown fox?"}]
    for where in ("jinja", "config"):
        reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
        reference.chat_template = CHATML
        reference.save_pretrained(tmp_path)
        if where == "config":  # move the template into tokenizer_config.json
            import json

            (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
            config = json.loads((tmp_path / "tokenizer_config.json").read_text())
            config["chat_template"] = CHATML
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        model = attnjax.load(tmp_path)
        text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(model, messages) == text
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        from attnjax.generate import prompt_ids

        ids, prompt_text = prompt_ids(model, messages)
        assert prompt_text == text and ids.tolist() == list(expected)


def test_a_long_prompts_prefill_builds_no_prompt_by_cache_matrix(tmp_path):
    """The prefill runs the model's own attention (the streaming kernel) on the prompt, so
    with Capture(stats=True) or no capture its program holds no (prompt, cache) or
    (prompt, prompt) array: a long prompt costs O(P) attention memory, not O(P x S)."""
    from tests.test_forward_api import all_shapes
    from attnjax.generate import advance
    from attnjax.models import kv_cache

    tiny_gpt2(tmp_path, with_tokenizer=False, n_positions=1600)
    model = attnjax.load(tmp_path)
    config = model.config
    prompt = 1100  # padded to its 1536-position bucket, over one 512-key block of the kernel
    size = 1536    # the cache: bucket_length(prompt + a few new tokens)
    ids = np.ones((1, size), np.int32)

    def shapes(capture):
        cache = kv_cache.empty_cache(config.num_layers, 1, size, config.num_heads,
                                     config.hidden_size // config.num_heads, np.float32)
        statics = dict(family=model.family, config=config, capture=capture,
                       recorded=capture.resolve_layers(config.num_layers), prefill=True)
        program = jax.make_jaxpr(lambda params, ids, cache: advance(
            params, ids, np.int32(prompt), np.int32(0), cache, np.int32(0), np.int32(0), np.float32(0),
            np.int32(0), np.float32(1), **statics))(model.params, ids, cache)
        return list(all_shapes(program.jaxpr))

    square = lambda shape: len(shape) >= 2 and shape[-2:] == (size, size)
    assert any(square(s) for s in shapes(Capture(attention=True))), "the check must see the matrix"
    assert not any(square(s) for s in shapes(Capture(stats=True)))
    assert not any(square(s) for s in shapes(Capture()))
