"""Capture (what a forward pass records) and Trace (what it returns).

``Capture`` is a frozen, hashable config: pass it as a static argument under
``jax.jit``. ``Trace`` is a registered pytree dataclass: its arrays flow through
jit/vmap/grad, while ``tokens``, ``layers``, ``windows`` and ``causal`` ride along as
static data.

Array layouts (L = number of recorded layers, B batch, H heads, T sequence):

- ``attention``        (L, B, H, Tq, Tk) softmax probabilities; padded keys exactly 0;
- ``scores``           (L, B, H, Tq, Tk) scaled pre-softmax logits (q.k * scale); at
                       masked positions they hold a large negative finite value;
- ``hidden_states``    (n_layers + 1, B, T, D): the embedding output, then every
                       block's output (always all layers, whatever ``layers`` says);
- ``attention_output`` (L, B, T, D) the attention sub-block's output projection,
                       before the residual add;
- ``stats``            AttentionStats with a leading L axis (streaming, no T x T);
- ``queries``          (L, B, H, T, head_dim) each query head's query vectors as the
                       scores read them (decoders: after RoPE, and Qwen3's q-norm);
- ``keys``, ``values`` (L, B, H_kv, T, head_dim) the key / value vectors of each kv head
                       (H_kv < H under grouped-query attention: query head h reads kv
                       head h // (H // H_kv)). With them, scale * q.k equals ``scores``
                       wherever the key is visible; Gemma 2's soft-capped layers hold
                       ``scores = c tanh(scale * q.k / c)`` (the capped logits), so
                       there the identity holds before the cap;
- ``mask``             (B, T) bool, True at real tokens;
- ``input_ids``        (B, T) int32.

Static fields:

- ``layers``   the model layer index (0-based) of each entry of the L axis; () when the
               Trace records no per-layer array (or was built by hand: then 0..L-1);
- ``windows``  the sliding window of each recorded layer, aligned with ``layers``: None
               (full attention) or W, where query i sees key j only when
               i - W < j <= i (Mistral on every layer, Gemma 2 on alternating layers,
               Qwen2/3 on layers >= max_window_layers). () means no recorded layer has a
               window (BERT, GPT-2, Llama, hand-built Traces). Analyses count a query's
               visible keys, and so normalise entropy, within its layer's window;
- ``scales``   the q.k scale of each recorded layer, aligned with ``layers`` (() when the
               Trace records no per-layer array or was built by hand);
- ``softcaps`` the score soft-cap c of each recorded layer (None: no cap; Gemma 2's
               ``attn_logit_softcapping``), aligned with ``layers``, or ();
- ``tokens``   the token strings of each sequence (padded to T), or None;
- ``causal``   True for decoders: query i sees keys j <= i.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from flax import struct

from attnjax.kernels.stats import AttentionStats


@dataclasses.dataclass(frozen=True)
class Capture:
    """What a forward pass records. Recording nothing costs nothing.

    attention:        full (T x T) attention probabilities per recorded layer.
    scores:           full pre-softmax scores per recorded layer.
    hidden_states:    the residual stream after the embeddings and after each block.
    attention_output: each recorded layer's attention sub-block output.
    stats:            streaming AttentionStats per recorded layer (no T x T matrix).
    pool:             with ``stats``, also the P x P pooled attention map.
    qkv:              each recorded layer's queries, keys and values (per head, as the
                      scores read them: decoders after RoPE), for step-by-step views
                      and query/key maps; with ``stats``, head_scores also recomputes
                      next_token, duplicate and induction from them. O(T) memory per
                      layer, no T x T matrix.
    layers:           which layers to record (0-based); None records every layer.
                      Kept sorted and without repeats, so the L axis of every recorded
                      array runs in model order: Capture(layers=(3, 1)).layers == (1, 3).
    """

    attention: bool = False
    scores: bool = False
    hidden_states: bool = False
    attention_output: bool = False
    stats: bool = False
    pool: Optional[int] = None
    qkv: bool = False
    layers: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
            if not self.layers:
                raise ValueError("Capture(layers=()) records no layer; pass None to record every layer.")
        if self.pool is not None:
            if not self.stats:
                raise ValueError("Capture(pool=...) needs stats=True: pooled maps are a streaming statistic.")
            if int(self.pool) < 1:
                raise ValueError(f"Capture(pool={self.pool}) must be a positive number of bins.")

    @classmethod
    def all(cls) -> "Capture":
        """Everything with a T x T matrix plus hidden states (short inputs)."""
        return cls(attention=True, scores=True, hidden_states=True, attention_output=True)

    @property
    def needs_matrix(self) -> bool:
        """True when the forward has to build the T x T attention matrix."""
        return self.attention or self.scores

    @property
    def records_layers(self) -> bool:
        return self.needs_matrix or self.attention_output or self.stats or self.qkv

    def resolve_layers(self, num_layers: int) -> Tuple[int, ...]:
        """The recorded layer indices, checked against the model's depth."""
        if self.layers is None:
            return tuple(range(num_layers))
        for i in self.layers:
            if not 0 <= i < num_layers:
                raise ValueError(
                    f"Capture(layers={self.layers}) names layer {i}, but the model has "
                    f"{num_layers} layers (valid: 0..{num_layers - 1})."
                )
        return self.layers


@struct.dataclass
class Trace:
    """Everything one forward pass recorded. Fields not captured are None."""

    mask: jax.Array                                   # (B, T) bool
    input_ids: jax.Array                              # (B, T) int32
    attention: Optional[jax.Array] = None             # (L, B, H, T, T)
    scores: Optional[jax.Array] = None                # (L, B, H, T, T)
    hidden_states: Optional[jax.Array] = None         # (n_layers + 1, B, T, D)
    attention_output: Optional[jax.Array] = None      # (L, B, T, D)
    stats: Optional[AttentionStats] = None            # leaves (L, B, H, ...)
    queries: Optional[jax.Array] = None               # (L, B, H, T, head_dim)
    keys: Optional[jax.Array] = None                  # (L, B, H_kv, T, head_dim)
    values: Optional[jax.Array] = None                # (L, B, H_kv, T, head_dim)
    layers: Tuple[int, ...] = struct.field(pytree_node=False, default=())
    windows: Tuple[Optional[int], ...] = struct.field(pytree_node=False, default=())  # per recorded layer
    scales: Tuple[float, ...] = struct.field(pytree_node=False, default=())  # per recorded layer
    softcaps: Tuple[Optional[float], ...] = struct.field(pytree_node=False, default=())  # per recorded layer
    tokens: Optional[Tuple[Tuple[str, ...], ...]] = struct.field(pytree_node=False, default=None)
    causal: bool = struct.field(pytree_node=False, default=False)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]

    @property
    def num_heads(self) -> int:
        for array in (self.attention, self.scores):
            if array is not None:
                return array.shape[2]
        if self.stats is not None:
            return self.stats.entropy.shape[2]
        if self.queries is not None:
            return self.queries.shape[2]
        raise ValueError("This Trace holds no attention or stats; capture attention=True or stats=True.")

    def with_tokens(self, tokens: Sequence[Sequence[str]]) -> "Trace":
        """A copy carrying the token strings of each sequence (padded to seq_len)."""
        return self.replace(tokens=tuple(tuple(str(t) for t in seq) for seq in tokens))

    def select(self, *, layers: Optional[Sequence[int]] = None,
               sequences: Optional[Sequence[int]] = None) -> "Trace":
        """A Trace holding only these recorded layers and sequences, every index checked.

        layers: model layer numbers, as in ``Trace.layers`` (not positions on the L axis);
        they must have been recorded. sequences: batch rows (negative counts from the end).
        Use this instead of indexing the arrays: JAX clamps an out-of-range index, so
        ``trace.attention[99]`` silently returns the last layer. ``hidden_states`` keeps
        every layer (its axis is the model's depth) and loses only the other sequences.
        """
        trace = self
        if layers is not None:
            trace = trace._select_layers(tuple(layers))
        if sequences is not None:
            trace = trace._select_sequences(tuple(sequences))
        return trace

    def _select_layers(self, layers: Tuple[int, ...]) -> "Trace":
        if not self.layers:
            raise ValueError("This Trace records no per-layer arrays; capture attention, scores, "
                             "attention_output, stats or qkv to select layers.")
        if not layers:
            raise ValueError("select(layers=()) selects nothing; name at least one layer.")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer not in self.layers:
                raise ValueError(f"select(layers=...): layer {layer!r} is not in this Trace, which holds layers "
                                 f"{self.layers}; record it with Capture(layers=...).")
        positions = np.asarray([self.layers.index(int(layer)) for layer in layers])  # (L',)
        take = lambda x: None if x is None else jax.tree.map(lambda a: a[positions], x)  # noqa: E731
        return self.replace(
            attention=take(self.attention), scores=take(self.scores),
            attention_output=take(self.attention_output), stats=take(self.stats),
            queries=take(self.queries), keys=take(self.keys), values=take(self.values),
            layers=tuple(int(layer) for layer in layers),
            windows=tuple(self.windows[p] for p in positions) if self.windows else (),
            scales=tuple(self.scales[p] for p in positions) if self.scales else (),
            softcaps=tuple(self.softcaps[p] for p in positions) if self.softcaps else (),
        )

    def _select_sequences(self, sequences: Tuple[int, ...]) -> "Trace":
        batch = self.batch_size
        if not sequences:
            raise ValueError("select(sequences=()) selects nothing; name at least one sequence.")
        for sequence in sequences:
            if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)) \
                    or not -batch <= sequence < batch:
                raise ValueError(f"select(sequences=...): sequence {sequence!r} is out of range; this Trace "
                                 f"holds {batch} (0..{batch - 1}, or -{batch}..-1 from the end).")
        rows = np.asarray([int(s) % batch for s in sequences])  # (B',)
        on_axis_1 = lambda x: None if x is None else jax.tree.map(lambda a: a[:, rows], x)  # noqa: E731
        return self.replace(
            mask=self.mask[rows], input_ids=self.input_ids[rows],
            attention=on_axis_1(self.attention), scores=on_axis_1(self.scores),
            hidden_states=on_axis_1(self.hidden_states), attention_output=on_axis_1(self.attention_output),
            stats=on_axis_1(self.stats),
            queries=on_axis_1(self.queries), keys=on_axis_1(self.keys), values=on_axis_1(self.values),
            tokens=None if self.tokens is None else tuple(self.tokens[r] for r in rows),
        )
