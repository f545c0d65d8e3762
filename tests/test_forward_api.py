"""Model.forward is a pure function; run() and forward reject bad input clearly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import Capture
from tests.tiny_models import tiny_gpt2


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(directory)
    return attnjax.load(directory)


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


def head_entropy(attention, layer, head):
    """Mean over queries of -sum p log p for one head; attention (L, B, N, T, T)."""
    p = attention[layer, :, head]  # (B, T, T)
    return -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1))


def test_jit_equals_eager(gpt2):
    ids = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]], np.int32)
    mask = np.array([[1] * 5, [1, 1, 1, 0, 0]], bool)
    capture = Capture(attention=True, hidden_states=True)
    eager_out, eager = gpt2.forward(gpt2.params, ids, mask, capture=capture)
    jit_out, jitted = gpt2.jit_forward(gpt2.params, ids, mask, capture=capture)
    np.testing.assert_allclose(jit_out.logits, eager_out.logits, atol=1e-5)
    np.testing.assert_allclose(jitted.attention, eager.attention, atol=1e-6)
    np.testing.assert_allclose(jitted.hidden_states, eager.hidden_states, atol=1e-5)


def test_vmap_equals_batched_call(gpt2):
    ids = np.array([[3, 4, 5, 6], [8, 9, 10, 11], [1, 2, 3, 4]], np.int32)
    capture = Capture(attention=True)

    def one(sequence):  # (1, T) -> attention (L, 1, N, T, T)
        return gpt2.forward(gpt2.params, sequence, capture=capture)[1].attention

    mapped = jax.vmap(one)(ids[:, None, :])  # (B, L, 1, N, T, T)
    batched = gpt2.forward(gpt2.params, ids, capture=capture)[1].attention  # (L, B, N, T, T)
    np.testing.assert_allclose(np.moveaxis(mapped[:, :, 0], 0, 1), batched, atol=1e-6)


def test_grad_of_head_entropy_wrt_embeddings(minilm):
    """d entropy / d inputs_embeds is finite and matches central finite differences.

    float64 throughout (params cast, x64 on) so the finite difference is accurate:
    with step 1e-4, truncation error ~1e-8 and rounding ~1e-12, rtol 1e-4 is loose.
    """
    batch = attnjax.tokenize(minilm, "Gradients flow through attention.")
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), minilm.params)
        embeds = params["embeddings"]["word_embeddings"]["embedding"][batch.input_ids]  # (1, T, D)

        def entropy(x):
            _, trace = minilm.forward(params, batch.input_ids, batch.attention_mask, inputs_embeds=x,
                                      capture=Capture(attention=True, layers=(2,)))
            return head_entropy(trace.attention, 0, 5)

        grad = jax.grad(entropy)(embeds)
        assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
        direction = jax.random.normal(jax.random.PRNGKey(0), embeds.shape, jnp.float64)
        step = 1e-4
        numeric = (entropy(embeds + step * direction) - entropy(embeds - step * direction)) / (2 * step)
        analytic = jnp.sum(grad * direction)
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-4)


def test_run_batches_and_pads_gpt2_on_the_right(gpt2):
    output, trace = attnjax.run(gpt2, ["The quick brown fox jumps.", "A cat."], return_output=True)
    lengths = np.asarray(trace.mask).sum(1)
    assert lengths[0] > lengths[1]
    assert np.asarray(trace.mask)[1, : lengths[1]].all() and not np.asarray(trace.mask)[1, lengths[1]:].any()
    assert output.logits.shape == (2, trace.seq_len, gpt2.config.vocab_size)
    assert "".join(trace.tokens[1][: lengths[1]]) == "A cat."
    assert trace.causal


@pytest.mark.parametrize("texts, message", [
    ("", "Text 0 is empty"),
    ("   ", "Text 0 is empty"),
    ([], "No text given"),
    (["fine", ""], "Text 1 is empty"),
    ([3], "must be a string"),
    (None, "texts is None"),
    ([b"hello"], r"got bytes \(decode bytes to a string first\)"),
])
def test_run_rejects_empty_or_odd_text(minilm, texts, message):
    with pytest.raises(ValueError, match=message):
        attnjax.run(minilm, texts)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(texts=b"hello"), TypeError, r"texts is bytes; decode it"),
    (dict(texts=3), TypeError, "texts must be a string, a list of strings .* got int"),
    (dict(texts="hi", attention_impl="bogus"), ValueError, "attention_impl='bogus' is not an attention implementation"),
    (dict(texts="hi", capture="attention"), TypeError, "capture must be an attnjax.Capture"),
])
def test_run_checks_its_arguments_up_front(minilm, kwargs, error, message):
    # Each used to be accepted (attention_impl), or to fail deep inside with a raw error.
    with pytest.raises(error, match=message):
        attnjax.run(minilm, **kwargs)


def test_too_long_text_needs_max_length(minilm):
    text = "word " * 600
    with pytest.raises(ValueError, match=r"more than the model's 512 positions. Pass max_length=512"):
        attnjax.run(minilm, text)
    trace = attnjax.run(minilm, text, max_length=64, capture=Capture(stats=False))
    assert trace.seq_len == 64 and trace.tokens[0][-1] == "[SEP]"
    with pytest.raises(ValueError, match="max_length=1000 must be between 1 and"):
        attnjax.run(minilm, "short", max_length=1000)


def test_forward_rejects_bad_arrays(minilm):
    ids = np.array([[101, 2000, 102]], np.int32)
    with pytest.raises(ValueError, match=r"Token id 40000 is outside the vocabulary \(0..30521\)"):
        minilm.forward(minilm.params, np.array([[101, 40000, 102]], np.int32))
    # jit_forward checks concrete inputs before tracing: inside jit the ids are abstract,
    # and an out-of-range id would come back as NaN rather than an error.
    with pytest.raises(ValueError, match=r"Token id 40000 is outside the vocabulary"):
        minilm.jit_forward(minilm.params, np.array([[101, 40000, 102]], np.int32))
    with pytest.raises(ValueError, match=r"Token id -1 is outside the vocabulary"):
        minilm.jit_forward(minilm.params, np.array([[101, -1, 102]], np.int32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 4\); it must match input_ids \(1, 3\)"):
        minilm.forward(minilm.params, ids, np.ones((1, 4), bool))
    with pytest.raises(ValueError, match=r"must be \(batch, seq\).*input_ids\[None\]"):
        minilm.forward(minilm.params, ids[0])
    with pytest.raises(ValueError, match="sequence has 600 tokens, but .* 512 positions"):
        minilm.forward(minilm.params, np.ones((1, 600), np.int32))
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 0\)"):
        minilm.forward(minilm.params, np.ones((1, 0), np.int32))
    with pytest.raises(ValueError, match="inputs_embeds holds NaN"):
        minilm.forward(minilm.params, ids, inputs_embeds=np.full((1, 3, 384), np.nan, np.float32))


def test_custom_attention_function_is_used(gpt2):
    """attention_impl plugs a user's function in; returning probs lets it be captured."""
    def uniform_attention(q, k, v, *, mask, causal, scale):
        seq_len = q.shape[1]
        visible = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None] & mask[:, None, None, :]  # (B, 1, T, T)
        probs = visible / visible.sum(-1, keepdims=True)  # (B, 1, T, T)
        probs = jnp.broadcast_to(probs, (q.shape[0], q.shape[2], seq_len, seq_len))  # (B, N, T, T)
        return jnp.einsum("BNTS,BSNH->BTNH", probs, v), probs

    ids = np.array([[3, 4, 5, 6]], np.int32)
    _, trace = gpt2.forward(gpt2.params, ids, capture=Capture(attention=True), attention_impl=uniform_attention)
    np.testing.assert_allclose(trace.attention[0, 0, 0, 3], [0.25] * 4)
    with pytest.raises(ValueError, match="custom attention function cannot produce"):
        gpt2.forward(gpt2.params, ids, capture=Capture(stats=True), attention_impl=uniform_attention)


def all_shapes(jaxpr):
    """Shapes of every intermediate in a jaxpr, recursing into loops and calls."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_shapes(inner)


def test_empty_capture_builds_no_attention_matrix(tmp_path):
    """With Capture() the traced program holds no (T, T) array; with attention it does."""
    tiny_gpt2(tmp_path, with_tokenizer=False, n_positions=1200)
    model = attnjax.load(tmp_path)
    seq_len = 1100  # over one 512-key block, so the blockwise kernel never holds a T x T tile
    ids = np.ones((1, seq_len), np.int32)

    def shapes(capture):
        jaxpr = jax.make_jaxpr(lambda p, x: model.forward(p, x, capture=capture))(model.params, ids)
        return list(all_shapes(jaxpr.jaxpr))

    square = lambda shape: len(shape) >= 2 and shape[-2:] == (seq_len, seq_len)
    assert any(square(s) for s in shapes(Capture(attention=True))), "the check must see a T x T matrix"
    assert not any(square(s) for s in shapes(Capture()))
    assert not any(square(s) for s in shapes(Capture(stats=True, hidden_states=True)))


def test_tune_host_allocator_is_safe_to_call_and_keeps_results():
    import sys

    model = attnjax.load("minilm")
    before = attnjax.run(model, "The allocator must not change any number.")
    applied = attnjax.tune_host_allocator()
    assert applied == sys.platform.startswith("linux")
    after = attnjax.run(model, "The allocator must not change any number.")
    np.testing.assert_array_equal(np.asarray(before.attention), np.asarray(after.attention))
    with pytest.raises(ValueError, match="keep_bytes"):
        attnjax.tune_host_allocator(2**31)


def test_capture_layers_run_in_model_order(minilm):
    # The L axis follows trace.layers; an unsorted or repeated selection would otherwise
    # label one layer's maps as another's.
    assert Capture(layers=(3, 1, 1)).layers == (1, 3)
    text = "Layers are recorded in model order."
    unsorted = attnjax.run(minilm, text, capture=Capture(attention=True, layers=(3, 1)))
    every = attnjax.run(minilm, text, capture=Capture(attention=True))
    assert unsorted.layers == (1, 3)
    # Two differently compiled programs: equal up to float32 rounding; a swapped layer
    # would be off by O(0.1).
    np.testing.assert_allclose(np.asarray(unsorted.attention), np.asarray(every.attention)[[1, 3]],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"Capture\(layers=\(\)\) records no layer"):
        Capture(layers=())


def test_pad_to_keeps_the_real_tokens_numbers(minilm):
    # Padding is masked: the statistics of real queries do not depend on it.
    text = "Padding to a bucket must not change a thing."
    plain = attnjax.run(minilm, text, capture=Capture(stats=True), pad_to="exact")
    padded = attnjax.run(minilm, text, capture=Capture(stats=True), pad_to=64)
    n = plain.seq_len
    assert int(np.asarray(plain.mask).sum()) == n  # "exact": no padding at all
    assert padded.seq_len == 64 and int(np.asarray(padded.mask).sum()) == n
    # Different compiled shapes: equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(padded.stats.entropy)[..., :n], np.asarray(plain.stats.entropy),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(padded.stats.received)[..., :n], np.asarray(plain.stats.received),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pad_to=600 must be between 1 and the model's 512 positions"):
        attnjax.run(minilm, text, pad_to=600)
    with pytest.raises(ValueError, match="pad_to must be None or 'bucket'"):
        attnjax.run(minilm, text, pad_to="fast")


def test_run_pads_to_a_length_bucket_by_default(minilm):
    # The default pads to the smallest bucket (16, 32, 64, ...): the real positions, their
    # tokens and numbers are those of the unpadded run; padding shows as the pad token.
    from attnjax.api import bucket_length
    from attnjax.tokenize import tokenize

    texts = ["Short one.", "A somewhat longer sentence, which still fits in thirty-two tokens."]
    exact = attnjax.run(minilm, texts, pad_to="exact")
    for default in (attnjax.run(minilm, texts), attnjax.run(minilm, texts, pad_to="bucket")):
        n = exact.seq_len
        assert n not in (16, 32) and default.seq_len == bucket_length(n, 512) == (16 if n <= 16 else 32)
        np.testing.assert_array_equal(np.asarray(default.mask)[:, :n], np.asarray(exact.mask))
        assert not np.asarray(default.mask)[:, n:].any()
        # Same tokens and ids as tokenize's own padding to that length.
        reference = tokenize(minilm, texts, pad_to=default.seq_len)
        assert default.tokens == reference.tokens
        assert [t[:n] for t in default.tokens] == list(exact.tokens)
        assert set(default.tokens[0][n:]) == {"[PAD]"}
        np.testing.assert_array_equal(np.asarray(default.input_ids), reference.input_ids)
        real = np.asarray(exact.mask)[None, :, None, :, None] & np.asarray(exact.mask)[None, :, None, None, :]
        np.testing.assert_allclose(np.where(real, np.asarray(default.attention)[..., :n, :n], 0),
                                   np.where(real, np.asarray(exact.attention), 0), rtol=1e-4, atol=1e-6)
    assert bucket_length(1, 512) == 16 and bucket_length(129, 512) == 256 and bucket_length(513, 4096) == 1024
    assert bucket_length(1500, 4096) == 1536 and bucket_length(300, 300) == 300 and bucket_length(60, 40) == 60
    # The corpus profile's finer buckets: halfway points between the powers of two.
    fine = sorted({bucket_length(n, 4096, fine=True) for n in range(1, 1100)})
    assert fine == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 1536]


def test_texts_that_truncation_cannot_fit_or_that_hold_no_words(minilm):
    with pytest.raises(ValueError, match=r"max_length=1 is too short: text 0 still has \d+ tokens"):
        attnjax.run(minilm, "hello world", max_length=1)
    with pytest.raises(ValueError, match=r"max_length=2 is too short"):
        attnjax.run(minilm, [("hello " * 600, "again")], max_length=2)
    with pytest.raises(ValueError, match="Text 0 produced no tokens besides special ones"):
        attnjax.run(minilm, "\u200b\u200b")  # zero-width spaces: no content tokens


def test_int64_ids_are_range_checked_before_conversion(minilm):
    # Without x64, jnp.asarray wraps int64 into int32: 2**33 + 5 would read as id 5.
    with pytest.raises(ValueError, match=r"Token id 8589934597 is outside the vocabulary"):
        minilm.forward(minilm.params, np.array([[101, 2**33 + 5, 102]], np.int64))
