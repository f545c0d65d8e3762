"""One character per attention weight: the overview's compact, browser-decodable encoding.

A weight w in [0, 1] becomes one of ``LEVELS`` printable ASCII characters:
code 0 for w < ``FLOOR``, else 1 + round((log10 w - log10 FLOOR) / DECADES * (LEVELS - 2)),
so codes are spaced evenly in log weight from FLOOR (1e-4) to 1. With 90 levels a
step is a factor 10**(4 / 88) = 1.11: a decoded weight is within 5.4 % of the true
one, well below what a colour scale shows. The alphabet leaves out ``"``, ``\\``,
``<``, ``>`` and ``&``, so a code string needs no escaping in JSON or HTML and
costs exactly one byte per weight.

The browser decodes a code string with a Vega expression (:func:`vega_decode`),
so a whole model's attention travels as one short string per head and a head is
expanded into cells only when it is shown.
"""

from __future__ import annotations

import numpy as np

ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\<>&')
LEVELS = len(ALPHABET)   # 90
FLOOR = 1e-4             # weights below this are coded 0
DECADES = 4.0            # log10(1 / FLOOR)
STEP = DECADES / (LEVELS - 2)
RELATIVE_ERROR = 10 ** (STEP / 2) - 1  # worst case after rounding, 0.054

_LOOKUP = np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)


def encode(weights: np.ndarray) -> str:
    """Code string of a weight array, flattened in C order."""
    return _LOOKUP[_levels(np.ravel(weights))].tobytes().decode("ascii")


def encode_each(maps: np.ndarray) -> list:
    """The code string of each map in (N, ...) ``maps`` (each flattened in C order), in one pass."""
    maps = np.asarray(maps)
    characters = _LOOKUP[_levels(maps.reshape(len(maps), -1))]                 # (N, size)
    return [row.tobytes().decode("ascii") for row in characters]


def _levels(weights: np.ndarray) -> np.ndarray:
    """The code (0 .. LEVELS - 1) of every weight."""
    weights = np.asarray(weights, dtype=np.float64)
    kept = weights >= FLOOR
    steps = np.round((np.log10(np.clip(weights, FLOOR, 1.0)) + DECADES) / STEP).astype(np.int64)
    return np.clip(np.where(kept, 1 + steps, 0), 0, LEVELS - 1)


def decode(text: str) -> np.ndarray:
    """The weights a code string stands for (the inverse of :func:`encode` up to rounding)."""
    codes = np.array([ALPHABET.index(c) for c in text], dtype=np.int64)
    return np.where(codes == 0, 0.0, 10.0 ** ((codes - 1) * STEP - DECADES))


def vega_decode(code: str) -> str:
    """A Vega expression for the weight of the code character expression ``code``."""
    alphabet = ALPHABET.replace("'", "\\'")
    index = f"indexof('{alphabet}', {code})"
    return f"({index} <= 0 ? 0 : pow(10, ({index} - 1) * {STEP!r} - {DECADES!r}))"
