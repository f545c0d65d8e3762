"""A model's structure from its params pytree and config, without running it.

``summary(model)`` is one row per node of the parameter tree, depth first, as the
module tree reads: the model, its top-level modules, each block, each projection,
down to the parameter arrays. Columns:

===============  ===========================================================================
module           "/"-joined path in the params pytree ("encoder/layer_0/attention/self/query",
                 ".../query/kernel"); the root row is the model's name
name             the last part of the path (what an indented tree prints)
depth            0 for the root, 1 for its children, ...
kind             "model", "module" or "param"
shape            a parameter's shape, e.g. "(384, 1536)"; "" for modules
params           number of scalars: a parameter's size, or a module's total
flops_per_token  forward FLOPs one token costs in it (below); a module's total
block            the transformer block (model layer) the row belongs to, -1 outside blocks
===============  ===========================================================================

FLOPs per token (Kaplan et al. 2020, "Scaling Laws", Table 1 convention: a multiply-add
is 2 FLOPs; elementwise work (biases, norms, activations, softmax, RoPE) is left out
because it is O(D) against the matmuls' O(D^2)):

- a weight matrix a token is multiplied by, (in, out): 2 * in * out;
- an embedding lookup: 0; BERT's pooler: 0 (it runs once per sequence, on [CLS]);
- a tied LM head (GPT-2, Gemma, tied Llama): 2 * D * vocab, on a row "lm_head (tied)"
  holding 0 params (its weights are the embedding's);
- each block's attention: q.k and weights.v for a query that sees ``tokens`` keys:
  2 * 2 * keys * heads * head_dim, on the attention module's row (a sliding-window
  layer sees at most its window). This is the only term that depends on the length.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import jax
import numpy as np

if TYPE_CHECKING:  # pandas is imported inside summary, so `import attnjax` stays light
    import pandas as pd

COLUMNS = ("module", "name", "depth", "kind", "shape", "params", "flops_per_token", "block")
DEFAULT_TOKENS = 128  # the context length the attention FLOPs are counted at
BLOCK_NAME = re.compile(r"^(?:layer|layers|h)_(\d+)$")
# The module of each family whose row carries the attention's own q.k / weights.v FLOPs.
ATTENTION_MODULE = {"bert": ("attention", "self"), "gpt2": ("attn",)}
LLAMA_ATTENTION = ("self_attn",)


def _paths(params) -> List[Tuple[Tuple[str, ...], Tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in keys), tuple(int(d) for d in np.shape(leaf)))
            for keys, leaf in flat]


def _leaf_flops(path: Tuple[str, ...], shape: Tuple[int, ...]) -> int:
    if path[-1] != "kernel" or len(shape) != 2 or "pooler" in path:
        return 0
    return 2 * shape[0] * shape[1]


def _block(path: Tuple[str, ...]) -> int:
    for part in path:
        match = BLOCK_NAME.match(part)
        if match:
            return int(match.group(1))
    return -1


def attention_flops(model, layer: int, tokens: int) -> int:
    """q.k plus weights.v FLOPs of one query seeing ``tokens`` keys in model layer ``layer``."""
    config = model.config
    windows = getattr(config, "windows", ())
    window = windows[layer] if windows else None
    keys = min(tokens, window) if window is not None else tokens
    return 2 * 2 * keys * config.num_heads * config.head_dim


def summary(model, *, tokens: int = DEFAULT_TOKENS) -> "pd.DataFrame":
    """The module tree of ``model`` with shapes, parameter counts and FLOPs per token.

    Built from ``model.params`` (shapes only) and ``model.config``; the model is not run.
    ``tokens``: the context length at which the attention's q.k and weights.v FLOPs are
    counted (module docstring). Columns and definitions in the module docstring.
    """
    if not hasattr(model, "params") or not hasattr(model, "config"):
        raise TypeError(f"summary(model) takes an attnjax Model (attnjax.load(...)); got {type(model).__name__}.")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"summary(tokens={tokens!r}): give the context length as a positive int.")
    leaves = _paths(model.params)
    attention = LLAMA_ATTENTION if model.family not in ATTENTION_MODULE else ATTENTION_MODULE[model.family]
    extra: Dict[Tuple[str, ...], int] = {}        # module path -> FLOPs not held by any leaf
    for path, _ in leaves:
        block = _block(path)
        if block >= 0:
            index = path.index(next(p for p in path if BLOCK_NAME.match(p)))
            module = path[: index + 1] + attention
            extra.setdefault(module, attention_flops(model, block, int(tokens)))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head_row: Optional[Tuple[str, ...]] = None
    if tied:  # the tied head multiplies by the embedding matrix: FLOPs without params
        head_row = ("lm_head (tied)",)
        extra[head_row] = 2 * model.config.hidden_size * model.config.vocab_size

    totals: Dict[Tuple[str, ...], List[int]] = {(): [0, 0]}
    order: List[Tuple[str, ...]] = [()]
    shapes: Dict[Tuple[str, ...], Tuple[int, ...]] = {}
    nodes = [(path, shape) for path, shape in leaves] + [(path, None) for path in extra]
    for path, shape in nodes:
        for depth in range(1, len(path) + 1):
            prefix = path[:depth]
            if prefix not in totals:
                totals[prefix] = [0, 0]
                order.append(prefix)
        own_params = int(np.prod(shape)) if shape is not None else 0
        own_flops = _leaf_flops(path, shape) if shape is not None else extra[path]
        if shape is not None:
            shapes[path] = shape
        for depth in range(0, len(path) + 1):
            totals[path[:depth]][0] += own_params
            totals[path[:depth]][1] += own_flops
    order = [()] + sorted(order[1:], key=lambda p: tuple(_sort_key(part) for part in p))
    rows = []
    root = model.name or model.family
    for path in order:
        kind = "model" if not path else ("param" if path in shapes else "module")
        rows.append({
            "module": "/".join(path) if path else root,
            "name": path[-1] if path else root,
            "depth": len(path),
            "kind": kind,
            "shape": str(shapes[path]) if path in shapes else "",
            "params": totals[path][0],
            "flops_per_token": totals[path][1],
            "block": _block(path),
        })
    import pandas as pd  # here, not at the top: `import attnjax` stays free of pandas

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame.attrs["tokens"] = int(tokens)
    return frame


def _sort_key(part: str):
    """Blocks in numeric order (layer_2 before layer_10); the tied head last."""
    match = re.match(r"^(.*?)(\d+)$", part)
    if part.startswith("lm_head"):
        return (2, part, 0)
    if match:
        return (1, match.group(1), int(match.group(2)))
    return (1, part, -1)
