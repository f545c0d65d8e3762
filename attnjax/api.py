"""The public entry points: load a checkpoint, run texts through it."""

from __future__ import annotations

import os
from typing import Optional

from attnjax.models.attention import AttentionImpl
from attnjax.models.checkpoints import load_directory, normalize_dtype, resolve
from attnjax.models.model import Model
from attnjax.tokenize import tokenize
from attnjax.trace import Capture

DEFAULT_CAPTURE = Capture(attention=True, hidden_states=True)


def load(name_or_path: str | os.PathLike, dtype=None) -> Model:
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
    """
    directory = resolve(name_or_path)
    family, config, params, tokenizer = load_directory(directory, normalize_dtype(dtype))
    return Model(family=family, config=config, params=params, tokenizer=tokenizer,
                 name=str(name_or_path))


def run(
    model: Model,
    texts,
    *,
    capture: Optional[Capture] = None,
    max_length: Optional[int] = None,
    pad_to: Optional[int] = None,
    attention_impl: AttentionImpl = "auto",
    return_output: bool = False,
    logits: Optional[str] = None,
):
    """Tokenise, pad (on the right), run the jitted forward and attach the tokens.

    texts: a string, a list of strings, or for BERT (first, second) sentence pairs.
    capture: what to record; default attention probabilities and hidden states.
    max_length: truncate to this many tokens; without it an over-long text is an error.
    pad_to: pad to at least this many positions, so that texts of different lengths
    reuse one compiled forward (padding is masked; real tokens' numbers do not change).
    Returns the Trace, or (output, Trace) with return_output=True (a decoder's logits, say).
    logits: which next-token logits a decoder computes (Model.forward): by default "all"
    with return_output=True and "none" without it (the LM head is then skipped); "last"
    gives each text's last real position only, (B, V).
    """
    capture = DEFAULT_CAPTURE if capture is None else capture
    if logits is None:
        logits = "all" if return_output else "none"
    batch = tokenize(model, texts, max_length=max_length, pad_to=pad_to)
    output, trace = model.jit_forward(
        model.params, batch.input_ids, batch.attention_mask, batch.token_type_ids,
        capture=capture, attention_impl=attention_impl, logits=logits,
    )
    trace = trace.with_tokens(batch.tokens)
    return (output, trace) if return_output else trace
