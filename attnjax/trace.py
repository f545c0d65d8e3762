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
- ``tokens``   the token strings of each sequence (padded to T), or None;
- ``causal``   True for decoders: query i sees keys j <= i.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax
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
        return self.needs_matrix or self.attention_output or self.stats

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
    layers: Tuple[int, ...] = struct.field(pytree_node=False, default=())
    windows: Tuple[Optional[int], ...] = struct.field(pytree_node=False, default=())  # per recorded layer
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
        raise ValueError("This Trace holds no attention or stats; capture attention=True or stats=True.")

    def with_tokens(self, tokens: Sequence[Sequence[str]]) -> "Trace":
        """A copy carrying the token strings of each sequence (padded to seq_len)."""
        return self.replace(tokens=tuple(tuple(str(t) for t in seq) for seq in tokens))
