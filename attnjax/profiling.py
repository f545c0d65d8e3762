"""attnjax.profile: head scores over a whole corpus, streamed, batched and sharded.

    frame = attnjax.profile(model, texts, batch_size=32, mesh=attnjax.data_mesh())

One row per (layer, head) holding head_scores's columns over the corpus, equal to
``head_scores([run(model, t, capture=...) for t in texts])`` (to float32 rounding): each
score is a sum over eligible queries divided by their count, and those sums and counts
add up across batches, devices, hosts and resumed runs. The sums, counts and parameters
are the analysis' own (attnjax.analysis.scores: _ELIGIBLE, LONG_COUNTS, ANOMALY_SUMS,
anomaly_parameters, sequence_chance_sums), so the length-aware scores agree too:
concentrated and jump count only texts long enough to judge (NaN, and said in
``attrs["nan_columns"]``, when none is), and the chance columns classify_heads reads are
the corpus means of the per-layer chance baselines. Each batch runs as one jitted
step (forward with streaming statistics, then per-text sums) on the batch sharded over
the mesh's "data" axis; the host adds the per-text sums in float64.

Columns beyond head_scores: category, decided_by, decision_score, decision_threshold
(classify_heads); n_texts and n_tokens (the corpus's counted texts and real tokens);
and ``<score>_std`` for every score: the population standard deviation across texts of
the text's own mean (texts where the score has no eligible query are left out; for
cls / sep / punctuation a text without such a key counts as 0 mass, as in the corpus
mean), how stable a head's role is.

``frame.attrs``: "skipped" (list of (index, reason) of the texts that could not be
used; ``skipped_texts(frame)`` as a DataFrame), "n_truncated", "nan_columns" (score
column -> why it is NaN over the corpus), "sources" (texts scored from full maps and
from statistics), "anomaly_parameters".
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attnjax.analysis._common import CLS_TOKENS, PUNCTUATION_TOKENS, SEP_TOKENS
from attnjax.analysis._qk_terms import qk_match_terms
from attnjax.analysis._terms import anomaly_sums, attention_score_terms, layer_windows
from attnjax.analysis.scores import (_ELIGIBLE, ANOMALY_SUMS, LONG_COUNTS, NEEDS_MAPS, SCORE_COLUMNS,
                                     anomaly_parameters, query_weights, scores_frame, sequence_chance_sums,
                                     stats_terms)
from attnjax.analysis.taxonomy import classify_heads
from attnjax.corpus import SKIP_REASONS, Batcher, Done, TokenClasses
from attnjax.parallel import allgather_ints, allgather_sum, check_mesh, data_size, params_on, place_params, put_batch
from attnjax.profile_state import COUNTS, Accumulator, load_checkpoint, save_checkpoint
from attnjax.trace import Capture

# Full (T x T) maps are built only for buckets up to this length (memory: L x B x H x T x T).
MAPS_MAX_LENGTH = 256
CHECKPOINT_EVERY = 50  # batches between checkpoint writes
_CLASS_COLUMNS = ("cls", "sep", "punctuation")


def profile(model, texts, *, batch_size: int = 32, max_length: Optional[int] = None, mesh=None,
            capture: Optional[Capture] = None, progress: bool = True, checkpoint=None,
            checkpoint_every: int = CHECKPOINT_EVERY, maps_max_length: int = MAPS_MAX_LENGTH,
            total: Optional[int] = None, thresholds=None) -> pd.DataFrame:
    """Per-head scores over a corpus (module docstring), reading ``texts`` once, lazily.

    texts: any iterable of str (bytes are decoded as UTF-8), e.g. a generator over a
    file; never held whole. Unusable texts (empty, not text, only special tokens) are
    skipped and listed in ``frame.attrs["skipped"]``. With several processes (after
    jax.distributed.initialize()) every process passes the same iterable and keeps
    texts i with i % process_count == process_index; all return the same frame.
    batch_size: texts per step (rounded up to a multiple of the mesh's data axis).
    max_length: truncate texts to this many tokens (default: the model's positions).
    mesh: a jax.sharding.Mesh with a "data" axis (and optionally "model": params not
    already on the mesh are then split Megatron-style, see attnjax.parallel).
    capture: None records streaming statistics only (O(T) memory; next_token,
    induction and duplicate are NaN, and ``attrs["nan_columns"]`` says why).
    Capture(stats=True, qkv=True) adds those three at any length, recomputed tile by
    tile from the recorded queries and keys (analysis._qk_terms; still O(T) memory).
    Capture(attention=True) builds full maps for buckets up to ``maps_max_length``
    tokens and uses the queries and keys for longer ones. ``capture.layers`` is honoured.
    progress: a tqdm bar with texts/s and tokens/s (ETA when ``total`` or len(texts) is known).
    checkpoint: a .npz path: partial sums are saved there every ``checkpoint_every``
    batches (atomically) and at the end; a rerun with the same model, settings and texts
    resumes after the texts already counted (another model or corpus is an error).
    thresholds: passed to classify_heads.
    """
    _check_model(model)
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings (a list, or a generator over a file); "
                        "to profile one text, pass [text].")
    if not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be an iterable of strings; got {type(texts).__name__}.")
    capture = Capture(stats=True) if capture is None else capture
    if not isinstance(capture, Capture) or not (capture.stats or capture.needs_matrix):
        raise ValueError(f"capture must be an attnjax.Capture recording stats or attention; got {capture!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    limit = model.config.max_positions
    if max_length is not None and not 1 <= int(max_length) <= limit:
        raise ValueError(f"max_length={max_length} must be between 1 and the model's {limit} positions.")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be a positive number of batches.")
    max_length = int(max_length or limit)
    params = model.params
    if mesh is not None:
        check_mesh(mesh)
        if not params_on(params, mesh):
            params = place_params(params, mesh)
    shards = data_size(mesh if jax.process_count() == 1 or mesh is None else mesh.local_mesh)
    batch_size = -(-int(batch_size) // shards) * shards

    layers = capture.resolve_layers(model.config.num_layers)
    windows = getattr(model.config, "windows", ())
    windows = layer_windows(tuple(windows[i] for i in layers) if windows else (), len(layers))
    parameters = tuple(anomaly_parameters().items())  # head_scores's defaults, hashable (a static jit argument)
    share = (jax.process_index(), jax.process_count())
    path = fingerprint = None
    if checkpoint is not None:
        path = _checkpoint_path(checkpoint, share)
        fingerprint = _fingerprint(model, params, capture, max_length, maps_max_length, parameters, share)
    accumulator, resume = None, None
    if path is not None and path.exists():
        accumulator, resume = load_checkpoint(path, fingerprint)
    if accumulator is None:
        accumulator = Accumulator(len(layers), model.config.num_heads)

    classes = TokenClasses(model, CLS_TOKENS, SEP_TOKENS, PUNCTUATION_TOKENS)
    batcher = Batcher(model, texts, batch_size=batch_size, max_length=max_length, share=share,
                      resume=resume, classes=classes)
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    bar = _progress(progress, total, accumulator)
    started, batches = time.perf_counter(), 0
    in_flight = None
    done = None
    try:
        for item in batcher:
            if isinstance(item, Done):
                done = item
                break
            maps = capture.needs_matrix and item.input_ids.shape[1] <= maps_max_length
            # Over the map budget, q and k give the map-only scores instead (analysis._qk_terms).
            step_capture = Capture(attention=True, layers=capture.layers) if maps else \
                Capture(stats=True, qkv=capture.needs_matrix or capture.qkv, layers=capture.layers)
            arrays = put_batch({"input_ids": item.input_ids, "mask": item.attention_mask,
                                "token_type_ids": item.token_type_ids, "classes": item.classes}, mesh)
            result = corpus_step(params, arrays["input_ids"], arrays["mask"], arrays["token_type_ids"],
                                 arrays["classes"], forward=model.forward, capture=step_capture,
                                 causal=model.causal, windows=windows, parameters=parameters)
            # the chance baselines depend only on the mask: numpy on the host while the step runs
            chance = sequence_chance_sums(item.attention_mask[item.valid], item.classes[item.valid],
                                          causal=model.causal, windows=windows)  # (B_valid, L) each
            if in_flight is not None:  # fetch the previous batch while this one runs
                batches += 1
                _finish(accumulator, *in_flight, bar, started)
                if path is not None and batches % checkpoint_every == 0:
                    save_checkpoint(path, accumulator, in_flight[0].position, fingerprint)
            in_flight = (item, result, chance, maps)
        if in_flight is not None:
            _finish(accumulator, *in_flight, bar, started)
        accumulator.add_skipped(done.position.skipped)
        bar.update(len(done.position.skipped))
    finally:
        bar.close()
    if path is not None:
        save_checkpoint(path, accumulator, done.position, fingerprint)
    return _frame(accumulator, classes, layers, windows, capture, thresholds, parameters)


def skipped_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """The texts attnjax.profile skipped: columns index (position in the input, 0-based)
    and reason."""
    rows = frame.attrs.get("skipped", [])
    return pd.DataFrame({"index": np.asarray([i for i, _ in rows], np.int64),
                         "reason": pd.Series([r for _, r in rows], dtype=object)})


def _check_model(model) -> None:
    from attnjax.models.model import Model

    if not isinstance(model, Model):
        raise TypeError(f"model must be an attnjax Model (attnjax.load(...)); got {type(model).__name__}.")
    if model.tokenizer is None:
        raise ValueError(f"{model.name or 'This model'} has no tokenizer files, so texts cannot be tokenised; "
                         "add tokenizer.json to the checkpoint directory.")


def _step(params, input_ids, mask, token_type_ids, classes, *, forward, capture, causal, windows, parameters,
          attention_impl="auto"):
    """Per-text sums (B, L, H) of every score over its eligible queries, per-text eligible
    counts (B, L) (every name of the analysis' _ELIGIBLE: query_weights's selectors, and
    anomaly_sums's long-only counts), and per-text anomaly sums, for one padded batch.
    parameters: anomaly_parameters() as (name, value) pairs."""
    _, trace = forward(params, input_ids, mask, token_type_ids, capture=capture, logits="none",
                       attention_impl=attention_impl)
    mask = mask.astype(bool)
    if capture.attention:
        terms = attention_score_terms(trace.attention, mask, input_ids, classes, causal=causal, windows=windows)
    else:
        terms = stats_terms(trace.stats, mask, classes, causal=causal, windows=windows)
        if capture.qkv:  # next_token, duplicate, induction from q, k and lse, tile by tile
            terms.update(qk_match_terms(trace, windows))
    weights = query_weights(mask, input_ids, causal=causal, windows=windows)  # (L, B, T) each
    out = {name: jnp.einsum("LBHQ,LBQ->BLH", terms[name], weights[_ELIGIBLE[name]],
                            precision=jax.lax.Precision.HIGHEST)  # (B, L, H)
           for name in SCORE_COLUMNS if name in terms}
    if not capture.attention:
        for name in _CLASS_COLUMNS:
            out[name] = jnp.moveaxis(terms[f"{name}_total"], 1, 0)  # (B, L, H)
    special = classes[..., 0] + classes[..., 1] > 0  # (B, T)

    def one_text(max_weight, top2, argmax, text_mask, ids, text_special):  # (L, H, T) ..., (T,)
        return anomaly_sums(max_weight[:, None], top2[:, None], argmax[:, None], text_mask[None], ids[None],
                            text_special[None], windows=windows, **dict(parameters))

    anomalies = jax.vmap(one_text, in_axes=(1, 1, 1, 0, 0, 0))(
        terms["max_weight"], terms["top2"], terms["argmax"], mask, input_ids, special)
    for name in ANOMALY_SUMS:
        out[name] = anomalies[name]  # (B, L, H)
    counts = {name: jnp.moveaxis(weights[name].sum(-1), 1, 0) for name in COUNTS if name not in LONG_COUNTS}  # (B, L)
    counts.update({name: anomalies[key] for name, key in LONG_COUNTS.items()})  # (B, L) texts long enough
    return out, counts


corpus_step = jax.jit(_step, static_argnames=("forward", "capture", "causal", "windows", "parameters",
                                             "attention_impl"))


def _finish(accumulator, batch, result, chance, maps, bar, started) -> None:
    sums, counts = jax.device_get(result)
    valid = batch.valid
    sums = {name: np.asarray(value, np.float64)[valid] for name, value in sums.items()}
    sums.update(chance)  # (B_valid, L) each, already valid rows only
    accumulator.add_batch(sums, {name: np.asarray(value, np.float64)[valid] for name, value in counts.items()},
                          batch, maps)
    accumulator.add_skipped(batch.position.skipped)
    bar.update(int(valid.sum()) + len(batch.position.skipped))
    seconds = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"{accumulator.session_tokens / seconds:,.0f} tokens/s", refresh=False)


def _progress(enabled, total, accumulator):
    from tqdm.auto import tqdm

    done = int(accumulator.scalars["n_texts"]) + len(accumulator.skipped)
    return tqdm(total=total, initial=done if total else 0, unit="text", desc="profile", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


def _checkpoint_path(checkpoint, share) -> Path:
    path = Path(checkpoint)
    if share[1] > 1:  # one file per process: each holds its own share's sums
        path = path.with_name(f"{path.stem}.process{share[0]}-of-{share[1]}{path.suffix or '.npz'}")
    return path


def _fingerprint(model, params, capture, max_length, maps_max_length, parameters, share) -> str:
    """What a checkpoint's sums depend on besides the texts: model, weights, settings."""
    leaves = jax.tree_util.tree_leaves(params)
    totals = jax.device_get(_leaf_sums(leaves))
    parts = [model.family, repr(model.config), repr(capture), max_length, maps_max_length, parameters, share,
             [(tuple(np.shape(leaf)), str(leaf.dtype)) for leaf in leaves], [float(t) for t in totals]]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


@jax.jit
def _leaf_sums(leaves):
    return [jnp.sum(leaf.astype(jnp.float32)) for leaf in leaves]


def _too_short(counts, layers, windows, parameters) -> dict:
    """{score: why it is NaN} for concentrated / jump where no text is long enough to judge
    in some layer (head_scores's NaN; the minimum lengths: attnjax.analysis.anomalies)."""
    out = {}
    for name, key in (("concentrated", "min_tokens_concentrated"), ("jump", "min_tokens_jump")):
        minimum = parameters[key]
        short = [i for i, count in enumerate(counts[_ELIGIBLE[name]]) if count == 0]
        if not short:
            continue
        narrow = sorted({windows[i] for i in short if windows[i] is not None and windows[i] < minimum})
        why = (f"no text reaches {minimum} tokens" if not narrow else
               f"the sliding window ({', '.join(map(str, narrow))} keys) is under {minimum} tokens")
        where = "" if len(short) == len(layers) else f" in layers {[layers[i] for i in short]}"
        out[name] = f"too short{where}: {why}, the minimum length for a {name} score (attnjax.analysis.anomalies)"
    return out


def _frame(accumulator, classes, layers, windows, capture, thresholds, parameters) -> pd.DataFrame:
    totals = accumulator.reduced(allgather_sum)
    skipped = allgather_ints(np.asarray(accumulator.skipped, np.int64).reshape(-1)).reshape(-1, 2)
    first_ids = np.unique(allgather_ints(np.asarray(sorted(accumulator.first_ids), np.int64)))
    n_texts = int(totals.scalars["n_texts"])
    if n_texts == 0:
        raise ValueError(f"No usable text: all {len(skipped)} texts were skipped "
                         f"({', '.join(sorted({SKIP_REASONS[r] for _, r in skipped})) or 'the corpus is empty'}).")
    sums = dict(totals.sums)
    nan_columns = {}
    maps_texts, stats_texts = int(totals.scalars["maps_texts"]), int(totals.scalars["stats_texts"])
    if not (capture.needs_matrix or capture.qkv):
        nan_columns = {name: "needs the attention maps or the queries and keys; pass "
                             "capture=Capture(stats=True, qkv=True) (any length, O(T) memory)" for name in NEEDS_MAPS}
    for name in nan_columns:
        sums.pop(name, None)
    nan_columns.update(_too_short(totals.counts, layers, windows, dict(parameters)))
    source = "stats" if not maps_texts else "attention" if not stats_texts else "attention+stats"
    first_tokens = set(classes.strings(first_ids)) if len(first_ids) else {None}
    frame = scores_frame(sums, totals.counts, totals.scalars["present"] > 0, first_tokens, layers, source)
    frame = classify_heads(frame, thresholds)
    frame["n_texts"] = n_texts
    frame["n_tokens"] = int(totals.scalars["n_tokens"])
    for name in SCORE_COLUMNS:
        std = totals.spread(name)
        frame[f"{name}_std"] = np.where(np.isfinite(frame[name].to_numpy()), std.reshape(-1), np.nan)
    frame.attrs.update({
        "skipped": [(int(i), SKIP_REASONS[int(r)]) for i, r in sorted(map(tuple, skipped))],
        "n_truncated": int(totals.scalars["n_truncated"]),
        "nan_columns": nan_columns,
        "sources": {"attention": maps_texts, "stats": stats_texts},
        "anomaly_parameters": dict(parameters),
    })
    return frame
