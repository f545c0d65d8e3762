"""The one place the model ports compute attention.

``attend`` takes a layer's projected q, k, v and the capture config and returns the
attention output plus what that layer records. It builds the T x T matrix only when
the capture asks for it (``attention`` or ``scores``); otherwise it hands q, k, v to
``attnjax.kernels.attention`` (blockwise on CPU, Pallas on GPU/TPU), which can also
emit streaming AttentionStats. A user-supplied attention function (``impl`` a
callable) replaces the kernel; see ``attend`` for its contract. During generation
``attend_with_cache`` does the same over a key/value cache (models/kv_cache.py).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import jax
import jax.numpy as jnp

from attnjax import kernels
from attnjax.models import kv_cache
from attnjax.trace import Capture

AttentionImpl = Union[str, Callable]


def check_attention_impl(impl) -> AttentionImpl:
    """``impl`` if it names a kernel implementation or is a callable; else a clear error."""
    if callable(impl) or (isinstance(impl, str) and impl in kernels.IMPLEMENTATIONS):
        return impl
    raise ValueError(
        f"attention_impl={impl!r} is not an attention implementation; pass one of "
        f"{', '.join(repr(name) for name in kernels.IMPLEMENTATIONS)} or your own function "
        "fn(q, k, v, *, mask, causal, scale).")


# Sequences per step of the dense path: enough that one step's (N, T, T) matrices stay
# in a CPU core's cache (about 4 MiB), so scores, softmax and the value product
# each touch them there instead of streaming the whole batch through memory.
DENSE_STEP_BYTES = 4 << 20


def full_attention(q, k, v, mask, *, causal: bool, scale: float, keep_scores: bool = True,
                   window: Optional[int] = None, softcap: Optional[float] = None):
    """Dense softmax attention that keeps the matrices (Hugging Face eager semantics).

    q: (B, T, Hq, H); k, v: (B, T, Hkv, H) with Hkv dividing Hq (query head h reads kv
    head h // (Hq // Hkv); K/V are not repeated); mask: (B, T) bool. Returns out
    (B, T, Hq, H), scores and probs (B, Hq, T, T), per query head, as
    kernels.reference_attention_weights defines them: scores are the scaled (and, with
    ``softcap``, capped) ones and hold MASK_VALUE at invisible keys (outside the mask,
    above the diagonal under causal, outside the ``window``), probs there are exactly
    0, and a row with no visible key is all zeros; scores is None unless
    ``keep_scores``. Works through the batch a few sequences at a time (lax.map), which
    on CPU runs large batches about twice as fast as one big step.
    """
    batch, num_queries, heads, _ = q.shape
    matrix_bytes = heads * num_queries * k.shape[1] * 4
    step = max(1, DENSE_STEP_BYTES // matrix_bytes)

    def attend_dense(q_, k_, v_, mask_):
        scores, probs = kernels.reference_attention_weights(
            q_, k_, mask_, causal, scale, window=window, softcap=softcap)  # (b, Hq, T, T)
        out = kernels.weighted_values(probs, v_).astype(v.dtype)  # (b, T, Hq, H)
        return out, (scores if keep_scores else None), probs

    if batch <= step:
        return attend_dense(q, k, v, mask)

    def one_sequence(args):  # lax.map vmaps this over `step` sequences at a time
        out, scores, probs = attend_dense(*(x[None] for x in args))
        return jax.tree.map(lambda x: x[0], (out, scores, probs))

    return jax.lax.map(one_sequence, (q, k, v, mask), batch_size=step)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    causal: bool,
    scale: float,
    capture: Capture,
    record: bool,
    impl: AttentionImpl = "auto",
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> tuple[jax.Array, Dict[str, jax.Array]]:
    """One layer's attention. Returns (out (B, T, Hq, H), records for this layer).

    q: (B, T, Hq, H); k, v: (B, T, Hkv, H), Hkv dividing Hq (grouped-query attention:
    query head h reads kv head h // (Hq // Hkv), as transformers' repeat_kv; K/V are
    never repeated). ``window=W`` (with causal): query i sees keys i - W < j <= i
    (Mistral / Gemma 2 sliding windows). ``softcap=c``: scores become c tanh(s / c)
    before masking (Gemma 2's attn_logit_softcapping). Semantics in
    ``attnjax.kernels.spec``; the arguments are checked there.

    ``record`` says whether this layer is among ``capture.layers``. Records hold
    ``attention`` / ``scores`` (B, Hq, T, T), per query head (scores capped and scaled,
    MASK_VALUE where invisible), and ``stats`` (AttentionStats, per query head) as
    asked. Statistics come from the streaming kernel (``impl``), or, when the layer
    builds the full matrix anyway, from that matrix (kernels.reference_stats).

    A callable ``impl`` is called as ``impl(q, k, v, mask=mask, causal=causal,
    scale=scale)``, with ``window=`` / ``softcap=`` added only when they are set, and
    returns the output, or ``(output, probs)`` with probs (B, Hq, T, T): probs are
    required to capture ``attention`` through it. Scores and streaming statistics are
    defined by attnjax's own kernels only.

    ``capture.qkv`` records ``queries`` (B, Hq, T, H) and ``keys`` / ``values``
    (B, Hkv, T, H), heads-major, exactly the q, k, v this function receives (so the
    decoders' are after RoPE): scale * q.k is the recorded score wherever the key is
    visible (before the soft-cap, when there is one). Any ``impl`` records them.
    """
    records: Dict[str, jax.Array] = {}
    if record and capture.qkv:
        records["queries"] = jnp.swapaxes(q, 1, 2)  # (B, Hq, T, H)
        records["keys"] = jnp.swapaxes(k, 1, 2)  # (B, Hkv, T, H)
        records["values"] = jnp.swapaxes(v, 1, 2)  # (B, Hkv, T, H)
    wants_matrix = record and capture.needs_matrix
    wants_stats = record and capture.stats
    options = dict(window=window, softcap=softcap)

    if callable(impl):
        if wants_stats or (record and capture.scores):
            raise ValueError(
                "A custom attention function cannot produce Capture(stats=...) or "
                "Capture(scores=...); capture attention=True (return (out, probs) from "
                "your function) or use attention_impl='auto'."
            )
        extra = {name: value for name, value in options.items() if value is not None}
        result = impl(q, k, v, mask=mask, causal=causal, scale=scale, **extra)
        out, probs = result if isinstance(result, tuple) else (result, None)
        if record and capture.attention:
            if probs is None:
                raise ValueError(
                    "Capture(attention=True) with a custom attention function needs it to "
                    "return (output, probs) with probs shaped (batch, heads, query, key)."
                )
            records["attention"] = probs
        return out, records

    if wants_matrix:
        # The dense path validates like the kernels' front door (one set of rules).
        mask, spec = kernels.normalize(q, k, v, mask=mask, causal=causal, scale=scale, **options)
        keep_scores = capture.scores or wants_stats
        out, scores, probs = full_attention(
            q, k, v, mask, causal=spec.causal, scale=spec.scale, keep_scores=keep_scores,
            window=spec.window, softcap=spec.softcap)
        if capture.attention:
            records["attention"] = probs
        if capture.scores:
            records["scores"] = scores
        if wants_stats:
            # The matrix exists anyway: read the statistics off it rather than run the
            # kernel a second time (same definitions; no gradient, as from the kernels).
            records["stats"] = jax.lax.stop_gradient(kernels.reference_stats(scores, probs, mask, capture.pool))
    elif wants_stats:
        out, records["stats"] = kernels.attention(
            q, k, v, mask=mask, causal=causal, scale=scale, stats=True,
            pool=capture.pool, impl=impl, **options,
        )
    else:
        out = kernels.attention(q, k, v, mask=mask, causal=causal, scale=scale, impl=impl, **options)
    return out, records


def attend_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cache: kv_cache.LayerCache,
                      offset, *, scale: float, capture: Capture, record: bool, impl: AttentionImpl = "auto",
                      window: Optional[int] = None, softcap: Optional[float] = None
                      ) -> tuple[jax.Array, Dict[str, jax.Array]]:
    """One layer's attention during generation: q, k, v (B, T, H*, H) at positions offset..,
    written into ``cache`` (B, S, Hkv, H) first. Returns (out (B, T, Hq, H), records), the
    records over all S cache slots and the updated cache under ``kv_cache.RECORD``.

    An ``offset`` that is the Python int 0 (the prefill: nothing is cached before these
    tokens) runs ``attend``, the model's own path: the streaming kernel, so no (T, S)
    matrix unless the capture asks for attention or scores; its records are widened from
    T to S keys (kv_cache.widen_records). Any other offset (a decode step; a traced 0
    included) attends over the cache densely, one (T, S) row block (kv_cache.attend_cached).
    """
    cache = kv_cache.write(cache, k, v, offset)
    options = dict(window=window, softcap=softcap)
    if isinstance(offset, int) and offset == 0:
        out, records = attend(q, k, v, mask, causal=True, scale=scale, capture=capture, record=record, impl=impl,
                              **options)
        records = kv_cache.widen_records(records, cache[0].shape[1])
    else:
        out, records = kv_cache.attend_cached(q, cache, offset, mask, scale=scale, capture=capture, record=record,
                                              **options)
    records[kv_cache.RECORD] = cache
    return out, records


def stack_layers(arrays: list[jax.Array]) -> jax.Array:
    """jnp.stack(arrays) written as in-place updates of one zeroed buffer.

    Same values as jnp.stack; XLA then writes each layer's array into its slot as the
    layer finishes, instead of keeping every layer's array alive until one final copy
    (MiniLM at 8 x 128 tokens with attention captured: 164 -> 150 ms on a 2-core CPU).
    """
    stacked = jnp.zeros((len(arrays),) + arrays[0].shape, arrays[0].dtype)  # (L, ...)
    for index, array in enumerate(arrays):
        stacked = stacked.at[index].set(array)
    return stacked


def stack_records(per_layer: list[Dict[str, jax.Array]], name: str) -> Optional[jax.Array]:
    """Stack one record over the recorded layers (leading L axis), or None."""
    values = [layer[name] for layer in per_layer if name in layer]
    if not values:
        return None
    return jax.tree.map(lambda *xs: stack_layers(list(xs)), *values)
