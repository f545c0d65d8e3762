"""Model: a loaded checkpoint and its pure forward function."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.models.attention import AttentionImpl, check_attention_impl, stack_layers, stack_records
from attnjax.models.bert import BertConfig
from attnjax.models.checkpoints import module_for
from attnjax.models.common import check_logits_option, is_decoder
from attnjax.models.gpt2 import GPT2Config
from attnjax.models.llama import LlamaConfig
from attnjax.trace import Capture, Trace


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(eq=False)
class Model:
    """A loaded checkpoint: config (frozen), params (pytree), tokenizer, forward.

    ``family`` is the checkpoint's model_type: "bert", "gpt2", or a Llama-like decoder
    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2").

    ``forward`` is a pure function of ``params`` and the inputs: jit it (capture,
    attention_impl and logits static), vmap it, differentiate it. ``jit_forward`` is
    that jit, compiled once per shape and capture, with the same input checks.
    """

    family: str
    config: Union[BertConfig, GPT2Config, LlamaConfig]
    params: Any
    tokenizer: Any = None
    name: str = ""
    eos_token_ids: Tuple[int, ...] = ()  # what ends a generation (checkpoints.read_eos_ids)

    @property
    def module(self):
        return module_for(self.family, self.config)

    @property
    def causal(self) -> bool:
        """True for the decoders (GPT-2 and the Llama-like families)."""
        return is_decoder(self.family)

    def forward(
        self,
        params,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        capture: Optional[Capture] = None,
        attention_impl: AttentionImpl = "auto",
        inputs_embeds=None,
        logits: str = "all",
    ):
        """Run the model. Returns (output, Trace).

        input_ids: (B, T) ints; attention_mask: (B, T), 1/True at real tokens (default
        all real); token_type_ids: (B, T) BERT segment ids (default 0; ignored by the
        decoders); inputs_embeds: (B, T, D) to use instead of the word embeddings of
        input_ids (position and segment embeddings are still added; Gemma's sqrt(hidden)
        scale is not), e.g. to differentiate with respect to the input.

        logits (decoders; static): "all" gives (B, T, V) next-token logits; "last" only
        each sequence's last real position (the last mask True), (B, V); "none" skips
        the LM head (output.logits is None). At long inputs (T, V) logits dominate memory.
        BERT has no LM head and ignores it.

        BERT's output is BertOutput(last_hidden_state, pooler_output); GPT-2's is
        GPT2Output(logits, last_hidden_state); the Llama-like decoders' LlamaOutput(logits,
        last_hidden_state). Decoder attention is recorded per query head (grouped-query
        models included): Trace.attention is (L, B, num_heads, T, T).

        Concrete inputs are checked (shapes, id and segment ranges) with a clear error.
        Inside your own jax.jit or jax.vmap the ids are abstract and cannot be checked:
        an out-of-vocabulary id then reads as a NaN embedding, so its sequence's outputs
        come back NaN rather than wrong. ``jit_forward`` checks before tracing.
        """
        capture = Capture() if capture is None else capture
        if not isinstance(capture, Capture):
            raise TypeError(f"capture must be an attnjax.Capture (e.g. Capture(attention=True)); got "
                            f"{type(capture).__name__}.")
        check_attention_impl(attention_impl)
        check_logits_option(logits)
        input_ids, mask, token_type_ids = self.check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
        recorded = capture.resolve_layers(self.config.num_layers)
        output, hidden_states, records = self.module.apply(
            {"params": params}, input_ids, mask, token_type_ids, capture, recorded,
            attention_impl, inputs_embeds, logits=logits,
        )
        windows = getattr(self.config, "windows", ())  # per model layer: None or the sliding window W; () for BERT, GPT-2
        trace = Trace(
            mask=mask,
            input_ids=input_ids,
            attention=stack_records(records, "attention"),
            scores=stack_records(records, "scores"),
            hidden_states=stack_layers(hidden_states) if capture.hidden_states else None,  # (L+1, B, T, D)
            attention_output=stack_records(records, "attention_output"),
            stats=stack_records(records, "stats"),
            queries=stack_records(records, "queries"),  # (L, B, H, T, head_dim)
            keys=stack_records(records, "keys"),  # (L, B, H_kv, T, head_dim)
            values=stack_records(records, "values"),  # (L, B, H_kv, T, head_dim)
            layers=recorded if capture.records_layers else (),
            windows=tuple(windows[i] for i in recorded) if windows and capture.records_layers else (),
            scales=tuple(self.attention_scale(i) for i in recorded) if capture.records_layers else (),
            softcaps=(getattr(self.config, "attn_logit_softcapping", None),) * len(recorded)
            if capture.records_layers else (),
            causal=self.causal,
        )
        return output, trace

    def attention_scale(self, layer: int) -> float:
        """The q.k scale of model layer ``layer`` (1 / sqrt(head_dim) unless the config says
        otherwise: GPT-2's inverse-layer scaling, Gemma 2's query_pre_attn_scalar)."""
        scale = getattr(self.config, "attention_scale", None)
        if callable(scale):  # GPT2Config.attention_scale(layer)
            return float(scale(layer))
        return float(scale) if scale is not None else 1.0 / math.sqrt(self.config.head_dim)

    @functools.cached_property
    def _jitted_forward(self):
        return jax.jit(self.forward, static_argnames=("capture", "attention_impl", "logits"))

    def jit_forward(self, params, input_ids, attention_mask=None, token_type_ids=None, *,
                    capture: Optional[Capture] = None, attention_impl: AttentionImpl = "auto",
                    inputs_embeds=None, logits: str = "all"):
        """``forward`` under jax.jit, compiled once per shape and capture.

        Concrete inputs are checked here, before tracing (inside jit the values are
        abstract, so an out-of-vocabulary id would otherwise read past the embedding
        table and come back as NaN instead of an error).
        """
        check_logits_option(logits)
        if is_concrete(input_ids):
            self.check_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
        return self._jitted_forward(params, input_ids, attention_mask, token_type_ids,
                                    capture=capture, attention_impl=attention_impl,
                                    inputs_embeds=inputs_embeds, logits=logits)

    def check_inputs(self, input_ids, attention_mask, token_type_ids, inputs_embeds):
        """Shapes, dtypes and (when the values are concrete) ranges of the inputs."""
        if is_concrete(input_ids):
            # Range-check before jnp.asarray: without x64 it would wrap int64 ids into int32.
            ids = np.asarray(input_ids)
            if ids.ndim == 2 and ids.size and np.issubdtype(ids.dtype, np.integer):
                if ids.min() < 0 or ids.max() >= self.config.vocab_size:
                    bad = int(ids.max()) if ids.max() >= self.config.vocab_size else int(ids.min())
                    raise ValueError(
                        f"Token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1}); "
                        "were these ids made by another model's tokenizer?"
                    )
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be (batch, seq); got shape {input_ids.shape}. "
                "Add a batch axis with input_ids[None]."
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers; got {input_ids.dtype}.")
        batch, seq_len = input_ids.shape
        if seq_len == 0 or batch == 0:
            raise ValueError(f"input_ids has shape {(batch, seq_len)}; give at least one sequence of one token.")
        if seq_len > self.config.max_positions:
            raise ValueError(
                f"The sequence has {seq_len} tokens, but {self.name or self.family} has "
                f"{self.config.max_positions} positions. Truncate it (attnjax.run(..., "
                f"max_length={self.config.max_positions})) or split the text."
            )
        if attention_mask is None:
            mask = jnp.ones((batch, seq_len), dtype=bool)
        else:
            mask = jnp.asarray(attention_mask)
            if mask.shape != (batch, seq_len):
                raise ValueError(
                    f"attention_mask has shape {mask.shape}; it must match input_ids {(batch, seq_len)}."
                )
            mask = mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, seq_len), dtype=jnp.int32)
        else:
            token_type_ids = jnp.asarray(token_type_ids)
            if token_type_ids.shape != (batch, seq_len):
                raise ValueError(
                    f"token_type_ids has shape {token_type_ids.shape}; it must match input_ids "
                    f"{(batch, seq_len)}."
                )
            types = getattr(self.config, "type_vocab_size", None)
            if types is not None and is_concrete(token_type_ids):
                values = np.asarray(token_type_ids)
                if values.min() < 0 or values.max() >= types:
                    raise ValueError(f"token_type_ids must be in 0..{types - 1}; got {values.max()}.")
        if inputs_embeds is not None:
            expected = (batch, seq_len, self.config.hidden_size)
            if tuple(inputs_embeds.shape) != expected:
                raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected {expected}.")
            if is_concrete(inputs_embeds) and not np.isfinite(np.asarray(inputs_embeds)).all():
                raise ValueError("inputs_embeds holds NaN or inf values.")
        return input_ids, mask, token_type_ids
