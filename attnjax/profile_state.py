"""The running sums of attnjax.profile, and their checkpoints.

``Accumulator`` holds float64 sums that add up exactly across batches, devices,
processes and resumed runs, named as attnjax.analysis.scores.score_sums and chance_sums
name them: per (layer, head) the sum of every score over its eligible queries (and
anomaly_sums's concentrated_on split), per layer the chance-baseline sums and the
eligible-query counts (one per name of the analysis' _ELIGIBLE, the long-only counts of
concentrated / jump included), and, for each head's spread across texts, the sum and
sum of squares of each text's own mean and the number of texts that had an eligible query.

Checkpoints are plain .npz archives (numbers and strings only; read back with
allow_pickle=False), written to a temporary file beside the target and renamed over it
(os.replace), so a killed job leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from attnjax.analysis.scores import _ELIGIBLE, ANOMALY_SUMS, CHANCE_COLUMNS, SCORE_COLUMNS

HEAD_SUMS = tuple(dict.fromkeys(SCORE_COLUMNS + ANOMALY_SUMS))  # (L, H) each
COUNTS = tuple(sorted(set(_ELIGIBLE.values())))  # (L,) eligible queries of each score
SCALARS = {"n_texts": (), "n_tokens": (), "n_truncated": (), "maps_texts": (), "stats_texts": (), "present": (3,)}
# 2: length-aware analysis (long-only counts, chance sums); a version-1 file lacks them.
CHECKPOINT_VERSION = 2


class Accumulator:
    def __init__(self, num_layers: int, num_heads: int):
        shape = (num_layers, num_heads)
        self.sums = {name: np.zeros(shape) for name in HEAD_SUMS}  # (L, H)
        self.sums.update({name: np.zeros(num_layers) for name in CHANCE_COLUMNS})  # (L,) per layer
        self.counts = {name: np.zeros(num_layers) for name in COUNTS}  # (L,)
        self.text_sum = {name: np.zeros(shape) for name in SCORE_COLUMNS}  # (L, H) sum of per-text means
        self.text_square = {name: np.zeros(shape) for name in SCORE_COLUMNS}  # (L, H) ... of their squares
        self.text_count = {name: np.zeros(shape) for name in SCORE_COLUMNS}  # (L, H) texts with a mean
        self.scalars = {name: np.zeros(shape_) for name, shape_ in SCALARS.items()}
        self.skipped: list = []          # (index, reason code)
        self.first_ids: set = set()      # token ids at position 0 (concentrated_on's label)
        self.session_tokens = 0          # tokens counted by this run (progress only)

    def add_batch(self, sums: Dict[str, np.ndarray], counts: Dict[str, np.ndarray], batch, maps: bool) -> None:
        """sums (B, L, H) (chance sums: (B, L)) and counts (B, L) of the valid rows of ``batch``;
        counts must hold every name of COUNTS (a KeyError names one missing)."""
        for name, value in sums.items():
            self.sums[name] += value.sum(0)
        for name in COUNTS:
            self.counts[name] += counts[name].sum(0)
        for name in SCORE_COLUMNS:
            if name not in sums:
                continue
            eligible = counts[_ELIGIBLE[name]][:, :, None]  # (B, L, 1)
            has = eligible > 0  # (B, L, 1)
            mean = np.where(has, sums[name] / np.maximum(eligible, 1.0), 0.0)  # (B, L, H)
            self.text_sum[name] += mean.sum(0)
            self.text_square[name] += (mean * mean).sum(0)
            self.text_count[name] += np.broadcast_to(has, mean.shape).sum(0)
        valid = batch.valid
        texts = int(valid.sum())
        tokens = int(batch.attention_mask[valid].sum())
        self.scalars["n_texts"] += texts
        self.scalars["n_tokens"] += tokens
        self.scalars["n_truncated"] += batch.truncated
        self.scalars["maps_texts" if maps else "stats_texts"] += texts
        self.scalars["present"] += batch.classes[valid].reshape(-1, 3).any(0)
        self.first_ids |= {int(i) for i in batch.input_ids[valid, 0]}
        self.session_tokens += tokens

    def add_skipped(self, skipped) -> None:
        self.skipped.extend((int(i), int(r)) for i, r in skipped)

    def spread(self, name: str) -> np.ndarray:
        """(L, H) population standard deviation across texts of each text's mean score."""
        n = self.text_count[name]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.text_sum[name] / n
            variance = np.maximum(self.text_square[name] / n - mean * mean, 0.0)
        return np.where(n > 0, np.sqrt(variance), np.nan)

    def numeric(self) -> Dict[str, np.ndarray]:
        """Every additive array, by a flat name."""
        arrays = {}
        for group in ("sums", "counts", "text_sum", "text_square", "text_count", "scalars"):
            for name, value in getattr(self, group).items():
                arrays[f"{group}.{name}"] = np.asarray(value, np.float64)
        return arrays

    def load_numeric(self, arrays: Dict[str, np.ndarray]) -> None:
        missing = sorted(set(self.numeric()) - set(arrays))
        if missing:
            raise ValueError(f"checkpoint lacks the arrays {', '.join(missing)}; delete it to start over.")
        for key, value in arrays.items():
            group, name = key.split(".", 1)
            target = getattr(self, group)
            if name not in target or np.shape(target[name]) != np.shape(value):
                raise ValueError(f"checkpoint array {key} has shape {np.shape(value)}; expected "
                                 f"{np.shape(target.get(name))}.")
            target[name] = np.array(value, np.float64)

    def reduced(self, reduce: Callable) -> "Accumulator":
        """A copy whose additive arrays are reduce(arrays) (a sum over processes)."""
        copy = Accumulator(*self.sums["entropy"].shape)
        copy.load_numeric(reduce(self.numeric()))
        return copy


def save_checkpoint(path: Path, accumulator: Accumulator, position, fingerprint: str) -> None:
    """Write the sums and the stream position atomically (temp file + os.replace)."""
    arrays = accumulator.numeric()
    arrays.update({
        "meta.version": np.asarray(CHECKPOINT_VERSION),
        "meta.fingerprint": np.asarray(fingerprint),
        "meta.digest": np.asarray(position.digest),
        "meta.read": np.asarray(position.read, np.int64),
        "meta.pending": np.asarray(position.pending, np.int64),
        "meta.skipped": np.asarray(accumulator.skipped, np.int64).reshape(-1, 2),
        "meta.first_ids": np.asarray(sorted(accumulator.first_ids), np.int64),
    })
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path, fingerprint: str) -> Tuple[Accumulator, Optional[Tuple[int, tuple, str]]]:
    """The accumulator and (read, pending, digest) saved at ``path``; ValueError when it was
    written by another model or settings, or is not a checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint {path} cannot be read as an attnjax profile checkpoint ({error}); "
                         "delete it to start over.") from None
    if int(arrays.get("meta.version", -1)) != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} is not an attnjax profile checkpoint (version "
                         f"{CHECKPOINT_VERSION}); delete it to start over.")
    if str(arrays["meta.fingerprint"]) != fingerprint:
        raise ValueError(f"checkpoint {path} was written for another model, weights, capture, max_length or "
                         "number of processes; rerun with the same ones, or delete it (or pass another "
                         "checkpoint path) to start over.")
    shape = arrays["sums.entropy"].shape
    accumulator = Accumulator(*shape)
    accumulator.load_numeric({k: v for k, v in arrays.items() if not k.startswith("meta.")})
    accumulator.add_skipped(arrays["meta.skipped"].reshape(-1, 2))
    accumulator.first_ids = {int(i) for i in arrays["meta.first_ids"]}
    resume = (int(arrays["meta.read"]), tuple(int(i) for i in arrays["meta.pending"]), str(arrays["meta.digest"]))
    return accumulator, resume
