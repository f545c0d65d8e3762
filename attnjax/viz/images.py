"""Attention maps as small indexed-colour PNG images (the overview's thumbnails).

A thumbnail is one head's (query, key) map, block-mean pooled to at most
``THUMB_MAX_BINS`` bins a side, coloured with the same perceptually uniform
scheme Vega uses (the palettes below are Vega's own control points, interpolated
piecewise-linearly in RGB as vega-scale does), upscaled by an integer factor with
nearest-neighbour so that browsers do not blur it, and written as an 8-bit
palette PNG (one byte per pixel before zlib; an attention map compresses well).
"""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Dict

import numpy as np

# Vega's continuous schemes (vega-scale src/schemes.js): hex control points,
# interpolated linearly in RGB between equally spaced stops.
SCHEMES: Dict[str, str] = {
    "viridis": (
        "440154470e61481a6c482575472f7d443a834144873d4e8a39568c35608d31688e2d708e2a788e"
        "27818e23888e21918d1f988b1fa08822a8842ab07f35b77943bf7154c56866cc5d7ad1518fd744"
        "a5db36bcdf27d2e21be9e51afde725"
    ),
    "magma": (
        "0000040404130b0924150e3720114b2c11603b0f704a107957157e651a80721f817f24828c2981"
        "9a2e80a8327db6377ac43c75d1426fde4968e95462f1605df76f5cfa7f5efc8f65fe9f6dfeaf78"
        "febf84fece91fddea0fcedaffcfdbf"
    ),
    "plasma": (
        "0d088723069033059742039d5002a25d01a66a00a87801a88405a7900da49c179ea72198b12a90"
        "ba3488c33d80cb4779d35171da5a69e16462e76e5bed7953f2834cf68f44fa9a3dfca636fdb32f"
        "fec029fcce25f9dc24f5ea27f0f921"
    ),
    "inferno": (
        "0000040403130c0826170c3b240c4f330a5f420a68500d6c5d126e6b176e781c6d86216b932667"
        "a12b62ae305cbb3755c73e4cd24644dd513ae65c30ed6925f3771af8850ffb9506fca50afcb519"
        "fac62df6d645f2e661f3f484fcffa4"
    ),
    "cividis": (
        "00205100235800265d002961012b65042e670831690d346b11366c16396d1c3c6e213f6e26426e"
        "2c456e31476e374a6e3c4d6e42506e47536d4c566d51586e555b6e5a5e6e5e616e62646f66676f"
        "6a6a706e6d717270717573727976737c79747f7c75827f758682768985778c8877908b78938e78"
        "9691789a94789e9778a19b78a59e77a9a177aea575b2a874b6ab73bbaf71c0b26fc5b66dc9b96a"
        "cebd68d3c065d8c462ddc85fe2cb5ce7cf58ebd355f0d652f3da4ff7de4cfae249fce647"
    ),
}

THUMB_MAX_BINS = 64      # pooled side length of a thumbnail, at most
PALETTE_SIZE = 256       # colours in an 8-bit palette PNG
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def palette(scheme: str) -> np.ndarray:
    """(256, 3) uint8 colours sampling ``scheme`` from its low to its high end."""
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown colour scheme {scheme!r}; choose one of {sorted(SCHEMES)}.")
    hexes = SCHEMES[scheme]
    stops = np.array([[int(hexes[i + j:i + j + 2], 16) for j in (0, 2, 4)]
                      for i in range(0, len(hexes), 6)], dtype=np.float64)  # (S, 3)
    positions = np.linspace(0.0, 1.0, len(stops))                           # (S,)
    samples = np.linspace(0.0, 1.0, PALETTE_SIZE)                           # (256,)
    channels = [np.interp(samples, positions, stops[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)           # (256, 3)


def pool_map(attention: np.ndarray, bins: int) -> np.ndarray:
    """Block mean of (..., Tq, Tk) maps into at most ``bins`` x ``bins`` cells each.

    Position t goes to bin floor(t * P / T), the binning of AttentionStats.pooled.
    """
    attention = np.asarray(attention, dtype=np.float64)
    rows = _bin_matrix(attention.shape[-2], bins)  # (Pq, Tq)
    cols = _bin_matrix(attention.shape[-1], bins)  # (Pk, Tk)
    return rows @ attention @ cols.T               # (..., Pq, Pk)


def _bin_matrix(length: int, bins: int) -> np.ndarray:
    """(P, T) averaging matrix of the binning t -> floor(t * P / T), P = min(bins, T)."""
    count = min(bins, length)
    assignment = (np.arange(length) * count) // length                     # (T,)
    matrix = (assignment[None, :] == np.arange(count)[:, None]).astype(np.float64)
    return matrix / matrix.sum(axis=1, keepdims=True)                      # (P, T)


def to_levels(values: np.ndarray, scale: str = "linear", floor: float = 1e-4) -> np.ndarray:
    """Map non-negative (..., Q, K) maps to colour levels 0..255, each relative to its own range.

    linear: value / max; log: log(value) between ``floor`` and max; quantile: the
    rank of each value among the map's values (so one dominant column cannot wash
    out the rest); absolute: the value itself on [0, 1] (not relative to the map).
    A map whose largest value is not positive is all level 0.
    """
    values = np.asarray(values, dtype=np.float64)                          # (..., Q, K)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    flat = values.reshape(values.shape[:-2] + (-1,))                       # (..., Q*K)
    top = flat.max(axis=-1)[..., None]                                     # (..., 1)
    positive = np.where(top > 0, top, 1.0)                                 # (..., 1)
    if scale == "linear":
        unit = flat / positive
    elif scale == "log":
        low = np.minimum(floor, positive)
        unit = (np.log(np.clip(flat, low, positive)) - np.log(low)) / np.maximum(np.log(positive) - np.log(low), 1e-12)
    elif scale == "absolute":  # the weight itself on [0, 1], not relative to the map's maximum
        unit = np.clip(flat, 0.0, 1.0)
    elif scale == "quantile":
        ranks = np.argsort(np.argsort(flat, axis=-1, kind="stable"), axis=-1, kind="stable")
        unit = ranks / max(flat.shape[-1] - 1, 1)
    else:
        raise ValueError(f"Unknown colour scale {scale!r}; choose 'linear', 'log', 'quantile' or 'absolute'.")
    unit = np.where(top > 0, unit, 0.0)
    return np.round(unit * (PALETTE_SIZE - 1)).astype(np.uint8).reshape(values.shape)


def png_indexed(levels: np.ndarray, colours: np.ndarray) -> bytes:
    """An 8-bit palette PNG of a (height, width) uint8 image."""
    height, width = levels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), levels.astype(np.uint8)], axis=1)
    # Filter type 0 on every row (the leading zero byte); zlib does the rest.
    chunks = [
        _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
        _chunk(b"PLTE", colours.astype(np.uint8).tobytes()),
        _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)),
        _chunk(b"IEND", b""),
    ]
    return PNG_SIGNATURE + b"".join(chunks)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def thumbnail(attention: np.ndarray, *, scheme: str = "viridis", scale: str = "linear",
              size: int = 48, max_bins: int = THUMB_MAX_BINS) -> str:
    """One head's (Tq, Tk) map as a ``data:image/png;base64`` URL at least ``size`` px wide.

    Maps longer than ``min(max_bins, size)`` are pooled first: a thumbnail drawn at
    ``size`` px cannot show more than ``size`` bins anyway.
    """
    return thumbnails(np.asarray(attention)[None], scheme=scheme, scale=scale, size=size, max_bins=max_bins)[0]


def thumbnails(maps: np.ndarray, *, scheme: str = "viridis", scale: str = "linear", size: int = 48,
               max_bins: int = THUMB_MAX_BINS) -> list:
    """``thumbnail`` of every (Tq, Tk) map in (..., Tq, Tk) ``maps``, in C order, pooled and
    coloured in one pass (one PNG is still written per map)."""
    maps = np.asarray(maps)
    bins = min(max_bins, size)
    pooled = pool_map(maps, bins) if max(maps.shape[-2:]) > bins else maps       # (..., Pq, Pk)
    levels = to_levels(pooled, scale)                                          # (..., Pq, Pk)
    factor = max(1, -(-size // max(levels.shape[-2:])))                        # ceil(size / P)
    levels = np.repeat(np.repeat(levels, factor, axis=-2), factor, axis=-1)    # (..., Pq * f, Pk * f)
    colours = palette(scheme)
    return ["data:image/png;base64," + base64.b64encode(png_indexed(image, colours)).decode("ascii")
            for image in levels.reshape((-1,) + levels.shape[-2:])]
