"""check_attention: accepts the reference variants, rejects the usual mistakes by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax.lab import AttentionCheckError, attention, check_attention


@pytest.mark.parametrize("name", sorted(attention.VARIANTS))
def test_accepts_reference_variants(name):
    fn = attention.VARIANTS[name]
    assert check_attention(fn, grouped=True) is fn  # softmax claims exactness: checked against the reference


def leaks_next_token(q, k, v, *, mask, causal, scale):
    """Softmax attention whose query i also sees key i + 1 (an off-by-one causal mask)."""
    length = q.shape[1]
    allowed = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None] + 1  # (T, S)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * scale  # (B, N, T, S)
    probs = jax.nn.softmax(jnp.where(allowed[None, None] & mask[:, None, None, :], scores, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def test_rejects_a_leak_of_the_next_token():
    with pytest.raises(AttentionCheckError, match=r"\[causality\].*changing token 1") as error:
        check_attention(leaks_next_token)
    assert error.value.check == "causality"


def test_rejects_a_wrong_output_shape_naming_the_dimension():
    def merged_heads(q, k, v, *, mask, causal, scale):  # forgot to split heads back out
        out = attention.softmax(q, k, v, mask=mask, causal=causal, scale=scale)
        return out.reshape(out.shape[0], out.shape[1], -1)

    with pytest.raises(AttentionCheckError, match=r"\[shapes\].*3 dimensions"):
        check_attention(merged_heads)

    def swapped_axes(q, k, v, *, mask, causal, scale):  # (B, N, T, H) instead of (B, T, N, H)
        return attention.softmax(q, k, v, mask=mask, causal=causal, scale=scale).transpose(0, 2, 1, 3)

    with pytest.raises(AttentionCheckError, match=r"\[shapes\]: output has query=4 .*expected query=8"):
        check_attention(swapped_axes)


@jax.custom_vjp
def doubles_gradient(x):
    """The identity, with a backward pass that doubles the cotangent (a wrong custom VJP)."""
    return x


doubles_gradient.defvjp(lambda x: (x, None), lambda _, cotangent: (2.0 * cotangent,))


def broken_gradient(q, k, v, *, mask, causal, scale):
    out, _ = attention.linear(q, k, v, mask=mask, causal=causal, scale=scale)
    return doubles_gradient(out)


def test_rejects_a_broken_custom_gradient():
    with pytest.raises(AttentionCheckError, match=r"\[gradients\]"):
        check_attention(broken_gradient)


def test_rejects_an_inexact_function_that_claims_exactness():
    with pytest.raises(AttentionCheckError, match=r"\[exact\]"):
        check_attention(attention.alibi, exact=True)


def test_rejects_a_function_that_ignores_padding():
    def no_padding(q, k, v, *, mask, causal, scale):
        return attention.softmax(q, k, v, mask=jnp.ones_like(mask), causal=causal, scale=scale)

    with pytest.raises(AttentionCheckError, match=r"\[padding\]"):
        check_attention(no_padding)
