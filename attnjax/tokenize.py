"""Text -> Batch: token ids, padding mask, segment ids and the token strings."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from attnjax.models.common import is_decoder

Text = Union[str, Tuple[str, str]]
# pad_to="bucket" pads to the smallest of these lengths that fits (the model's max
# positions if none does), so that a new text reuses a compiled forward and analyses.
SMALLEST_BUCKET = 16
LARGEST_POWER_BUCKET = 512  # above it, multiples of 512 (less padding on long inputs)


def bucket_length(length: int, limit: int, *, fine: bool = False) -> int:
    """The padded length of the default buckets, capped at the model's max positions
    `limit`: powers of two from 16 to 512 (16, 32, 64, 128, 256, 512), then multiples of
    512, the smallest that holds `length` tokens.

    fine: also the points halfway in between (24, 48, 96, 192, 384; a step of 1.5 then
    4/3), for the corpus profile, where each bucket compiles once for the whole corpus
    and padding is paid on every text: it profiles MiniLM on 8-256-token texts about 18 %
    faster (benchmarks/RESULTS.md). Interactive use keeps the coarse buckets, so fewer
    new lengths compile.
    """
    bucket = SMALLEST_BUCKET
    while bucket < length and bucket < LARGEST_POWER_BUCKET:
        power_of_two = bucket & (bucket - 1) == 0
        bucket = (bucket * 3 // 2 if power_of_two else bucket * 4 // 3) if fine else bucket * 2
    if bucket < length:
        bucket = -(-length // LARGEST_POWER_BUCKET) * LARGEST_POWER_BUCKET
    return max(min(bucket, limit), length)


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray        # (B, T) int32
    attention_mask: np.ndarray   # (B, T) bool, True at real tokens
    token_type_ids: np.ndarray   # (B, T) int32
    tokens: Tuple[Tuple[str, ...], ...]  # B sequences of T display strings (padding included)


def as_list(texts) -> list:
    if texts is None:
        raise ValueError("texts is None; pass a string, a list of strings or (BERT) a list of pairs.")
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts is bytes; decode it to a string first, e.g. texts.decode('utf-8').")
    if isinstance(texts, (str, tuple)):
        texts = [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a string, a list of strings or (BERT) a list of pairs; got "
                        f"{type(texts).__name__}.") from None
    if not texts:
        raise ValueError("No text given: pass a string, a list of strings or (BERT) a list of pairs.")
    for i, text in enumerate(texts):
        parts = text if isinstance(text, tuple) else (text,)
        if not all(isinstance(p, str) for p in parts) or len(parts) not in (1, 2):
            hint = " (decode bytes to a string first)" if isinstance(text, (bytes, bytearray)) else ""
            raise ValueError(f"Text {i} must be a string or a pair of strings; got "
                             f"{type(text).__name__}{hint}.")
        if any(not p.strip() for p in parts):
            raise ValueError(f"Text {i} is empty; give it some words.")
    return texts


def display_tokens(tokenizer, family: str, ids: Sequence[int]) -> Tuple[str, ...]:
    """Readable token strings: WordPiece pieces for BERT; for the decoders (GPT-2,
    Llama-like) each id decoded on its own, so byte-level pieces read as text."""
    if is_decoder(family):
        return tuple(tokenizer.decode([int(i)]) for i in ids)
    return tuple(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def encode_all(tokenizer, texts: list, **options) -> list:
    """Each text's encoding as a dict of lists, in one batched tokenizer call when the
    texts are all single strings or all pairs (the fast tokenizer then works in parallel)."""
    if not texts:
        return []
    if all(isinstance(t, str) for t in texts):
        batch = tokenizer(texts, verbose=False, **options)
    elif all(isinstance(t, tuple) for t in texts):
        batch = tokenizer([t[0] for t in texts], [t[1] for t in texts], verbose=False, **options)
    else:
        return [tokenizer(*(t if isinstance(t, tuple) else (t,)), verbose=False, **options)
                for t in texts]
    return [{name: batch[name][i] for name in batch.keys()} for i in range(len(texts))]


def tokenize(model, texts, *, max_length: Optional[int] = None,
             pad_to: Union[None, int, str] = None) -> Batch:
    """Tokenise and pad on the right; too-long texts are an error unless max_length truncates.

    pad_to: None pads to the longest text; an int pads the batch to at least this many
    positions (at most the model's); "bucket" pads to ``bucket_length`` of the longest
    text. Either way texts of different lengths share one compiled program; padding is
    masked, so the real tokens' numbers do not change.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(
            f"{model.name or 'This model'} has no tokenizer files; call model.forward with token ids, "
            "or add tokenizer.json to the checkpoint directory."
        )
    texts = as_list(texts)
    limit = model.config.max_positions
    if max_length is not None:
        if not 1 <= max_length <= limit:
            raise ValueError(f"max_length={max_length} must be between 1 and the model's {limit} positions.")
    if pad_to is not None and pad_to != "bucket" and not 1 <= pad_to <= limit:
        raise ValueError(f"pad_to={pad_to} must be between 1 and the model's {limit} positions.")
    if is_decoder(model.family) and any(isinstance(t, tuple) for t in texts):
        raise ValueError(f"Sentence pairs are a BERT input; give {model.family} plain strings.")

    cap = max_length if max_length is not None else limit
    encoded = encode_all(tokenizer, texts, truncation=False)
    too_long = [i for i, features in enumerate(encoded) if len(features["input_ids"]) > cap]
    if too_long and max_length is None:
        i = too_long[0]
        raise ValueError(
            f"Text {i} has {len(encoded[i]['input_ids'])} tokens, more than the model's {limit} "
            f"positions. Pass max_length={limit} (or less) to truncate it, or split the text."
        )
    truncated = encode_all(tokenizer, [texts[i] for i in too_long], truncation=True, max_length=max_length)
    for i, features in zip(too_long, truncated):
        encoded[i] = features
    special = set(tokenizer.all_special_ids)
    for i, features in enumerate(encoded):
        ids = features["input_ids"]
        if all(int(t) in special for t in ids):
            raise ValueError(f"Text {i} produced no tokens besides special ones; give it some words.")
        if len(ids) > cap:  # truncation cannot cut the special tokens
            raise ValueError(
                f"max_length={max_length} is too short: text {i} still has {len(ids)} tokens after "
                "truncation (special tokens are never cut); pass a larger max_length."
            )
    encoded = [(list(f["input_ids"]), list(f.get("token_type_ids") or [0] * len(f["input_ids"])))
               for f in encoded]

    seq_len = max(len(ids) for ids, _ in encoded)
    if pad_to == "bucket":
        seq_len = bucket_length(seq_len, limit)
    elif pad_to is not None:
        seq_len = max(seq_len, pad_to)
    # Padding is masked, so any id in the vocabulary serves: the pad token, else the
    # end-of-text token (GPT-2 and Llama have no pad token), else 0. Special tokens
    # (a decoder's BOS) come from the tokenizer's own post-processor, never added here.
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if t is not None and 0 <= t < model.config.vocab_size), 0)
    pad_text = tokenizer.pad_token or tokenizer.eos_token or ""
    batch = len(encoded)
    input_ids = np.full((batch, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((batch, seq_len), dtype=bool)
    token_type_ids = np.zeros((batch, seq_len), dtype=np.int32)
    tokens = []
    for row, (ids, types) in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
        token_type_ids[row, : len(ids)] = types
        strings = display_tokens(tokenizer, model.family, ids)
        tokens.append(strings + (pad_text,) * (seq_len - len(ids)))
    return Batch(input_ids, mask, token_type_ids, tuple(tokens))
