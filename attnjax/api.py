"""The public entry points: load a checkpoint, run texts through it."""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from attnjax.models.attention import AttentionImpl
from attnjax.models.checkpoints import load_directory, normalize_dtype, read_eos_ids, resolve
from attnjax.models.model import Model
from attnjax.tokenize import bucket_length, tokenize  # noqa: F401  (bucket_length: part of run's contract)
from attnjax.trace import Capture

DEFAULT_CAPTURE = Capture(attention=True, hidden_states=True)
PadTo = Union[None, int, str]


def _check_pad_to(pad_to: PadTo) -> PadTo:
    if pad_to is None or pad_to in ("bucket", "exact"):
        return pad_to
    if isinstance(pad_to, (bool, np.bool_)) or not isinstance(pad_to, (int, np.integer)):
        raise ValueError(f"pad_to must be None or 'bucket' (the default), 'exact', or a number of "
                         f"positions; got {pad_to!r}.")
    return int(pad_to)


def load(name_or_path: str | os.PathLike, dtype=None, mesh=None) -> Model:
    """Load a BERT, GPT-2 or Llama-like decoder checkpoint.

    ``"minilm"``: the bundled all-MiniLM-L6-v2 (offline); a local Hugging Face
    directory (config.json + model.safetensors or a sharded index, tokenizer files if
    present) whose model_type is bert, gpt2, llama, mistral, qwen2, qwen3, gemma or
    gemma2; or a hub id such as ``"gpt2"`` when online.

    dtype: None loads float32 (whatever the file stores), for exact parity with
    transformers in float32. "bfloat16" (or jnp.bfloat16) stores the params in
    bfloat16 and runs the decoder in it (norms and softmax in float32, as transformers
    does), halving the memory of a big checkpoint; attention statistics stay float32.
    BERT and GPT-2 load in float32 only.

    mesh: a jax.sharding.Mesh to place the params on: replicated over its "data" axis,
    and split Megatron-style over its "model" axis if it has one (heads and MLP width;
    attnjax.parallel), for a model that does not fit one device. attnjax.profile then
    runs on it as it is.
    """
    directory = resolve(name_or_path)
    family, config, params, tokenizer = load_directory(directory, normalize_dtype(dtype))
    if mesh is not None:
        from attnjax.parallel import place_params

        params = place_params(params, mesh)
    return Model(family=family, config=config, params=params, tokenizer=tokenizer,
                 name=str(name_or_path), eos_token_ids=read_eos_ids(directory))


def run(
    model: Model,
    texts,
    *,
    capture: Optional[Capture] = None,
    max_length: Optional[int] = None,
    pad_to: PadTo = None,
    attention_impl: AttentionImpl = "auto",
    return_output: bool = False,
    logits: Optional[str] = None,
):
    """Tokenise, pad (on the right), run the jitted forward and attach the tokens.

    texts: a string, a list of strings, or for BERT (first, second) sentence pairs.
    capture: what to record; default attention probabilities and hidden states.
    max_length: truncate to this many tokens; without it an over-long text is an error.
    pad_to: how far to pad (padding is masked, so real tokens' numbers never change;
    Trace.mask says which positions are real, and the padding shows as the pad token):
      None or "bucket" (default): to the smallest length bucket that fits the longest
        text: powers of two from 16 to 512 (16, 32, 64, ...), then multiples of 512,
        capped at the model's max positions (bucket_length). A new text of a similar
        length then reuses the compiled forward and analyses instead of compiling new
        ones (seconds) for its exact length. Exception: with Capture(pool=P), whose P
        bins divide the padded length, None keeps the exact length (so the bins cover
        the real tokens only); "bucket" pads it anyway;
      "exact": no padding beyond the longest text (the Trace is as long as that text);
      an int n: to at least n positions (at most the model's), e.g. one length for a
        whole corpus; longer texts keep their length.
    Returns the Trace, or (output, Trace) with return_output=True (a decoder's logits, say).
    logits: which next-token logits a decoder computes (Model.forward): by default "all"
    with return_output=True and "none" without it (the LM head is then skipped); "last"
    gives each text's last real position only, (B, V).
    """
    capture = DEFAULT_CAPTURE if capture is None else capture
    if logits is None:
        logits = "all" if return_output else "none"
    pad_to = _check_pad_to(pad_to)
    if pad_to is None:  # pooled maps keep the exact length: their bins divide it
        pad_to = "bucket" if getattr(capture, "pool", None) is None else "exact"
    batch = tokenize(model, texts, max_length=max_length, pad_to=None if pad_to == "exact" else pad_to)
    output, trace = model.jit_forward(
        model.params, batch.input_ids, batch.attention_mask, batch.token_type_ids,
        capture=capture, attention_impl=attention_impl, logits=logits,
    )
    trace = trace.with_tokens(batch.tokens)
    return (output, trace) if return_output else trace
