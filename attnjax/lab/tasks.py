"""Training data for the lab: tasks that draw (batch, length) int32 batches.

A task has ``vocab`` (ids 0..vocab-1), ``length`` (tokens per sequence),
``batches(batch_size, seed)`` (an endless iterator of (B, T) int32 arrays) and
``symbols`` (the string of each id, or None): with symbols, ``train`` gives the model a
character-level tokenizer (``char_tokenizer``), saved beside it as tokenizer.json, so
``attnjax.run`` and ``attnjax report`` can read text. Id 0 is ``<unk>`` in both tasks
here: characters the vocabulary lacks map to it (and padding uses it, masked).

- ``repeated_tokens(vocab, length)``: a random first half, then the same half again.
  The second half is predictable only by looking back one repeat (find the earlier
  copy of the current token, predict what followed it): the task that grows induction
  heads (Olsson et al. 2022, "In-context learning and induction heads").
- ``char_text(path, length)``: windows of a UTF-8 file's characters.
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

UNK = "<unk>"
# Printable symbols that name repeated_tokens's ids 1..: letters, digits, punctuation.
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + "!#$%&()*+,-./:;<=>?@[]^_{|}~"


@dataclasses.dataclass(frozen=True)
class RepeatedTokens:
    """Sequences of ``length`` ids drawn uniformly from 1..vocab-1 (id 0, <unk>, is never
    drawn) in which a random segment is repeated.

    ``probe_batch`` (and ``shifted=False``): a random first half, then the same half again.
    Training batches (``shifted=True``, the default) put a random-length prefix of random
    ids before the segment (0 to length // 2 ids; the segment gets the rest, half each),
    so the repeat starts at a different offset in each sequence. Without it a one-layer
    model finds a shortcut: with the repeat always length // 2 back, learned position
    embeddings (or RoPE) let one head attend to position i - length // 2 + 1 and copy,
    which the head scores classify as induction in layer 0. A moving offset leaves only
    the induction circuit: a previous-token head, then a head that attends to the token
    after the earlier copy of the current one.
    """

    vocab: int
    length: int
    shifted: bool = True

    def __post_init__(self):
        if isinstance(self.vocab, bool) or not isinstance(self.vocab, int) or self.vocab < 3:
            raise ValueError(f"repeated_tokens(vocab={self.vocab!r}): expected an integer >= 3.")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 4 or self.length % 2:
            raise ValueError(f"repeated_tokens(length={self.length!r}): expected an even integer >= 4 "
                             "(a first half and its repeat).")

    @property
    def symbols(self) -> Optional[Tuple[str, ...]]:
        if self.vocab - 1 > len(ALPHABET):
            return None  # more ids than printable symbols: no tokenizer
        return (UNK,) + tuple(ALPHABET[: self.vocab - 1])

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        positions = np.arange(self.length)[None]  # (1, T)
        while True:
            ids = rng.integers(1, self.vocab, size=(batch_size, self.length), dtype=np.int32)  # (B, T)
            prefix = rng.integers(0, self.length // 2 + 1, size=(batch_size, 1)) if self.shifted \
                else np.zeros((batch_size, 1), int)  # (B, 1)
            half = (self.length - prefix) // 2  # (B, 1): segment length
            prefix = self.length - 2 * half  # an odd remainder joins the prefix
            repeat = (positions >= prefix + half)  # (B, T): the second copy
            source = np.where(repeat, positions - half, positions)  # (B, T)
            yield np.take_along_axis(ids, source, axis=1)  # (B, T)

    def probe_batch(self, batch_size: int, seed: int = 0) -> np.ndarray:
        """(B, T) fresh sequences: a random first half, then the same half again."""
        return next(dataclasses.replace(self, shifted=False).batches(batch_size, seed))


@dataclasses.dataclass(frozen=True)
class CharText:
    """Random windows of ``length`` characters of a text; ids index ``symbols``."""

    ids: np.ndarray = dataclasses.field(repr=False)   # (N,) int32, the whole text
    symbols: Tuple[str, ...]
    length: int
    source: str = ""

    @property
    def vocab(self) -> int:
        return len(self.symbols)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        while True:
            starts = rng.integers(0, len(self.ids) - self.length + 1, size=batch_size)  # (B,)
            yield self.ids[starts[:, None] + np.arange(self.length)[None]]  # (B, T)

    def encode(self, text: str) -> np.ndarray:
        index = {symbol: i for i, symbol in enumerate(self.symbols)}
        return np.asarray([index.get(ch, 0) for ch in text], np.int32)  # (N,)


def repeated_tokens(vocab: int, length: int, *, shifted: bool = True) -> RepeatedTokens:
    """Random first half, then the same half again; in training batches after a random-length
    prefix unless ``shifted=False`` (RepeatedTokens says why)."""
    return RepeatedTokens(vocab, length, shifted)


def char_text(path, length: int = 128) -> CharText:
    """Character-level text of a UTF-8 file; the vocabulary is <unk> plus its characters, sorted."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"char_text({str(path)!r}): no such file; give a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"char_text({str(path)!r}): the file is not UTF-8 text.") from None
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"char_text(length={length!r}): expected an integer >= 2.")
    if len(text) <= length:
        raise ValueError(f"char_text({str(path)!r}): the file has {len(text)} characters; it needs more than "
                         f"length={length} to cut training windows from (use a longer file or a smaller length).")
    symbols = (UNK,) + tuple(sorted(set(text) - {UNK}))
    task = CharText(ids=np.zeros(0, np.int32), symbols=symbols, length=length, source=str(path))
    return dataclasses.replace(task, ids=task.encode(text))


def char_tokenizer(symbols, context: int):
    """A ``tokenizers`` tokenizer with one token per symbol (no merges, no special tokens
    but <unk> at id 0), and the tokenizer_config.json dict that goes with it."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "pad_token": UNK,
              "model_max_length": context, "clean_up_tokenization_spaces": False}
    return backend, config
