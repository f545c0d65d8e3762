"""A corpus as a stream of length-bucketed batches, tokenised on a background thread.

``Batcher`` reads an iterable of texts once (a generator over a file is never held
whole or iterated twice), keeps this process's share (text i goes to process
i % process_count), tokenises chunks of texts in one fast-tokenizer call, and sorts
the texts into length buckets (attnjax.tokenize.bucket_length with fine=True: 16, 24,
32, 48, ..., 384, 512, then multiples of 512), so the device sees few shapes and
little padding. A bucket that holds ``batch_size``
texts leaves as a Batch; at the end the partial buckets leave padded with copies of
their first row (marked invalid, so they count for nothing).

Texts that cannot be used are skipped with a reason code (SKIP_REASONS) and their
index; over-long texts are truncated to ``max_length`` (default: the model's positions).

Every batch carries a ``Position``: how far the stream had been read when it left,
which texts read so far are still waiting in a bucket, and which were skipped since the
previous batch. Once every batch up to one is counted, exactly the texts with index
< ``read`` that are not ``pending`` are accounted for: a checkpoint saves that, and a
resumed run skips them.

Readers of corpus files for the command line: attnjax.readers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from attnjax.tokenize import bucket_length, display_tokens, encode_all

SKIP_REASONS = ("not a string", "not UTF-8", "empty", "only special tokens",
                "longer than max_length even after truncation (its special tokens alone)")
NOT_STRING, NOT_UTF8, EMPTY, ONLY_SPECIAL, TOO_LONG = range(5)
CHUNK = 256  # texts tokenised per fast-tokenizer call (at most; 4 batches' worth when smaller)
QUEUE_DEPTH = 4  # batches tokenised ahead of the device


@dataclasses.dataclass(frozen=True)
class Position:
    read: int                     # texts read from the stream (all processes' indices)
    pending: Tuple[int, ...]      # indices read but still in a bucket
    digest: str                   # sha256 of the texts read, for checking a resume
    skipped: Tuple[Tuple[int, int], ...]  # (index, reason code) skipped since the last batch


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray       # (B, T) int32
    attention_mask: np.ndarray  # (B, T) bool
    token_type_ids: np.ndarray  # (B, T) int32
    classes: np.ndarray         # (B, T, 3) float32 [CLS]-like, [SEP]-like, punctuation keys
    valid: np.ndarray           # (B,) bool: False on padding rows of a partial batch
    indices: np.ndarray         # (B,) int64 corpus index of each row (-1 on padding rows)
    truncated: int              # texts in this batch cut to max_length
    position: Position


@dataclasses.dataclass(frozen=True)
class Done:
    position: Position


class Batcher:
    """Iterate over Batch items, then one Done; errors from the reader re-raise here."""

    def __init__(self, model, texts: Iterable, *, batch_size: int, max_length: int,
                 share: Tuple[int, int] = (0, 1), resume: Optional[Tuple[int, Tuple[int, ...], str]] = None,
                 classes: "TokenClasses"):
        self.model = model
        self.classes = classes
        self.chunk = max(batch_size, min(CHUNK, 4 * batch_size))  # small batches leave early (checkpoints)
        self.batch_size = batch_size
        self.max_length = max_length
        self.share = share
        self.resume = resume
        self._texts = texts
        self._queue: "queue.Queue" = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attnjax-tokenize", daemon=True)

    def __iter__(self) -> Iterator:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Done):
                    return
        finally:
            self._stop.set()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped()

    def _run(self) -> None:
        try:
            self._read()
        except _Stopped:
            pass
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, which re-raises)
            try:
                self._put(error)
            except _Stopped:
                pass

    def _read(self) -> None:
        rank, count = self.share
        skip_until, skip_pending, expected_digest = self.resume or (0, (), "")
        skip_pending = set(skip_pending)
        digest = hashlib.sha256()
        self._buckets: dict = {}
        self._skipped: List[Tuple[int, int]] = []
        chunk: List[Tuple[int, object]] = []
        read = 0
        for index, text in enumerate(self._texts):
            if self._stop.is_set():
                return
            if index == skip_until and expected_digest and digest.hexdigest() != expected_digest:
                raise ValueError(_MISMATCH)
            digest.update(_fingerprint_bytes(text))
            read = index + 1
            if index % count != rank or (index < skip_until and index not in skip_pending):
                continue
            chunk.append((index, text))
            if len(chunk) == self.chunk:
                self._tokenize(chunk)
                chunk = []
                self._emit_full(read, digest.hexdigest())
        if read < skip_until or (read == skip_until and expected_digest and digest.hexdigest() != expected_digest):
            raise ValueError(_MISMATCH)
        self._tokenize(chunk)
        self._emit_full(read, digest.hexdigest())
        for length in sorted(self._buckets):
            while self._buckets.get(length):
                self._emit(length, read, digest.hexdigest())
        self._put(Done(Position(read, (), digest.hexdigest(), tuple(self._skipped))))

    def _tokenize(self, chunk: List[Tuple[int, object]]) -> None:
        usable = []
        for index, text in chunk:
            if isinstance(text, (bytes, bytearray)):
                try:
                    text = bytes(text).decode("utf-8")
                except UnicodeDecodeError:
                    self._skipped.append((index, NOT_UTF8))
                    continue
            if not isinstance(text, str):
                self._skipped.append((index, NOT_STRING))
            elif not _encodable(text):
                self._skipped.append((index, NOT_UTF8))
            elif not text.strip():
                self._skipped.append((index, EMPTY))
            else:
                usable.append((index, text))
        tokenizer = self.model.tokenizer
        encoded = encode_all(tokenizer, [text for _, text in usable], truncation=False)
        long = [i for i, features in enumerate(encoded) if len(features["input_ids"]) > self.max_length]
        cut = encode_all(tokenizer, [usable[i][1] for i in long], truncation=True, max_length=self.max_length)
        for i, features in zip(long, cut):
            encoded[i] = features
        special = set(tokenizer.all_special_ids)
        limit = self.model.config.max_positions
        long = set(long)
        for position, ((index, _), features) in enumerate(zip(usable, encoded)):
            ids = list(features["input_ids"])
            if all(int(t) in special for t in ids) or len(ids) > self.max_length:
                self._skipped.append((index, ONLY_SPECIAL if len(ids) <= self.max_length else TOO_LONG))
                continue
            types = list(features.get("token_type_ids") or [0] * len(ids))
            bucket = bucket_length(len(ids), limit, fine=True)
            self._buckets.setdefault(bucket, []).append((index, ids, types, position in long))

    def _emit_full(self, read: int, digest: str) -> None:
        for length in sorted(self._buckets):
            while len(self._buckets[length]) >= self.batch_size:
                self._emit(length, read, digest)

    def _emit(self, length: int, read: int, digest: str) -> None:
        rows = self._buckets[length][:self.batch_size]
        self._buckets[length] = self._buckets[length][self.batch_size:]
        pending = tuple(sorted(i for items in self._buckets.values() for i, *_ in items))
        position = Position(read, pending, digest, tuple(self._skipped))
        self._skipped = []
        self._put(make_batch(rows, self.batch_size, length, self.model, self.classes, position))


def make_batch(rows, batch_size: int, length: int, model, classes: "TokenClasses", position: Position) -> Batch:
    """Pad ``rows`` (index, ids, types, truncated) to (batch_size, length) arrays; missing
    rows repeat the first one and are marked invalid."""
    tokenizer = model.tokenizer
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if t is not None and 0 <= t < model.config.vocab_size), 0)  # as attnjax.tokenize
    input_ids = np.full((batch_size, length), pad_id, np.int32)  # (B, T)
    mask = np.zeros((batch_size, length), bool)  # (B, T)
    types = np.zeros((batch_size, length), np.int32)  # (B, T)
    valid = np.zeros(batch_size, bool)  # (B,)
    indices = np.full(batch_size, -1, np.int64)  # (B,)
    for row in range(batch_size):
        index, ids, segment, _ = rows[min(row, len(rows) - 1)]
        input_ids[row, :len(ids)] = ids
        mask[row, :len(ids)] = True
        types[row, :len(ids)] = segment
        if row < len(rows):
            valid[row], indices[row] = True, index
    return Batch(input_ids, mask, types, classes.of(input_ids, mask), valid, indices,
                 sum(int(r[3]) for r in rows), position)


class _Stopped(Exception):
    """The consumer stopped reading (an error, or the caller closed the stream)."""


_MISMATCH = ("the checkpoint was written for a different corpus (its first texts differ from these); "
             "give the same texts in the same order, or delete the checkpoint to start over.")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes read with surrogateescape
        return False
    return True


def _fingerprint_bytes(text) -> bytes:
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        data = repr(type(text)).encode()
    return len(data).to_bytes(8, "little") + data


class TokenClasses:
    """[CLS]-like, [SEP]-like and punctuation keys by token id, as
    attnjax.analysis._common.token_classes decides them from display strings; ids are
    looked up once and cached."""

    def __init__(self, model, cls_tokens, sep_tokens, punctuation):
        from attnjax.analysis._common import _strip_word_start

        self.model, self._strip = model, _strip_word_start
        self.names = (tuple(cls_tokens), tuple(sep_tokens), tuple(punctuation))
        self.cache: dict = {}

    def strings(self, ids) -> List[str]:
        missing = [int(i) for i in ids if int(i) not in self.cache]
        if missing:
            for token_id, text in zip(missing, display_tokens(self.model.tokenizer, self.model.family, missing)):
                self.cache[token_id] = (text, self._classes(text))
        return [self.cache[int(i)][0] for i in ids]

    def _classes(self, text: str) -> np.ndarray:
        cls_tokens, sep_tokens, punctuation = self.names
        causal = self.model.causal
        return np.array([not causal and text in cls_tokens, not causal and text in sep_tokens,
                         self._strip(text) in punctuation], np.float32)

    def of(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T, 3) float32 classes of the non-padding positions."""
        unique, inverse = np.unique(input_ids, return_inverse=True)
        self.strings(unique)
        table = np.stack([self.cache[int(i)][1] for i in unique])  # (U, 3)
        return table[inverse.reshape(input_ids.shape)] * mask[..., None]  # (B, T, 3)
