"""train: fit a small decoder to next-token prediction, watching its heads as it learns.

Recipe: cross-entropy of every position's next token (mean over the batch's B x (T - 1)
predictions); optax AdamW (b1 0.9, b2 0.95, weight decay 0.01 on matrices and
embeddings only) with a linear warm-up over the first ``warmup`` steps (default 5 % of
``steps``) and cosine decay to lr / 10 at the end; one jitted step.

Every ``log_every`` steps (and after the last) the history gains, for each head, a row
with the mean training loss since the previous log and the head's scores
(attnjax.analysis.head_scores) and category (classify_heads) on a fixed probe batch, run
through model.forward with Capture(attention=True) and the same attention function.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from tqdm.auto import tqdm

from attnjax import analysis
from attnjax.models.attention import check_attention_impl
from attnjax.lab.config import GPTConfig, new_model
from attnjax.lab.model import LabModel, attach_tokenizer
from attnjax.trace import Capture

PROBE_ROWS = 16          # sequences in the default probe batch
LOG_POINTS = 20          # default number of history points: log_every = steps // LOG_POINTS
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.01
FINAL_LR_FRACTION = 0.1


@dataclasses.dataclass
class TrainResult:
    """model: the trained LabModel; history: the DataFrame the module docstring describes:
    step, tokens (seen so far), seconds (since the first step started), loss, then one row
    per (layer, head) with head_scores's columns and category (absent when the attention
    function returns no probs and is not exact)."""

    model: LabModel
    history: pd.DataFrame


def next_token_loss(model, params, batch, impl):
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; batch (B, T)."""
    output, _ = model.forward(params, batch[:, :-1], capture=Capture(), attention_impl=impl)
    logits = output.logits  # (B, T-1, V)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def decay_mask(params):
    """Weight decay on matrices and embeddings, not on biases or norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def trainable_mask(params, frozen):
    """1.0 where a parameter trains, 0.0 on ``frozen`` paths (GPTConfig.frozen_paths)."""
    frozen = set(frozen)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 0.0 if tuple(k.key for k in path) in frozen else 1.0, params)


def make_optimizer(lr: float, steps: int, warmup: int):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=lr * FINAL_LR_FRACTION)
    return optax.adamw(schedule, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY, mask=decay_mask)


def batch_source(data, batch_size: int, seed: int):
    """(iterator of (B, T) int32 batches, the task or None)."""
    if hasattr(data, "batches") and hasattr(data, "vocab"):
        return data.batches(batch_size, seed), data
    if isinstance(data, (np.ndarray, jax.Array)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an attnjax.lab.tasks task (repeated_tokens, char_text) or an iterator "
                        f"of (batch, length) int arrays; got {type(data).__name__}.")
    return iter(data), None


def checked_batch(batch, vocab: int, context: int, number: int) -> np.ndarray:
    batch = np.asarray(batch)
    if batch.ndim != 2 or not np.issubdtype(batch.dtype, np.integer):
        raise ValueError(f"data: batch {number} has shape {batch.shape} and dtype {batch.dtype}; "
                         "expected (batch, length) integer token ids.")
    if batch.shape[1] < 2 or batch.shape[1] > context + 1:
        raise ValueError(f"data: batch {number} has length {batch.shape[1]}; the model sees at most "
                         f"context={context} tokens (a batch holds context + 1 for the last target).")
    if batch.min() < 0 or batch.max() >= vocab:
        raise ValueError(f"data: batch {number} holds id {int(batch.max() if batch.max() >= vocab else batch.min())}"
                         f", outside the model's vocabulary 0..{vocab - 1}; raise GPTConfig(vocab=...).")
    return batch.astype(np.int32)


def probe_frame(model, params, probe, impl) -> Optional[pd.DataFrame]:
    """head_scores + category of every head on the probe batch, or None without probs."""
    output, trace = model.jit_forward(params, probe, capture=Capture(attention=True),
                                      attention_impl=impl, logits="none")
    del output
    return analysis.classify_heads(analysis.head_scores(trace))


def probe_impl(impl):
    """The attention function the probe runs: the model's own when it returns probs; the
    dense softmax path ("auto") for one that claims exactness; None when neither."""
    if isinstance(impl, str):  # attnjax's own kernels: the probe takes the dense path
        return impl
    q = jnp.ones((1, 8, 4, 8), jnp.float32)  # (B, T, N, H), check_attention's sizes
    result = jax.eval_shape(lambda: impl(q, q, q, mask=jnp.ones((1, 8), bool), causal=True, scale=1.0))
    if isinstance(result, tuple):
        return impl
    return "auto" if getattr(impl, "exact", False) else None


def train(config_or_model, data, *, steps: int, batch_size: int, lr: float, seed: int = 0,
          attention_impl=None, log_every: Optional[int] = None, probe=None,
          warmup: Optional[int] = None, progress: bool = True) -> TrainResult:
    """Train a GPTConfig (fresh init from ``seed``) or a LabModel (continue) on ``data``.

    data: a task from attnjax.lab.tasks, or any iterator of (batch, length) int arrays.
    attention_impl: None (a LabModel's own function, else attnjax's softmax kernel), a
    kernel name ("reference", "blockwise", "pallas"), or fn(q, k, v, *, mask, causal,
    scale), checked with check_attention before the first step. probe: (B, T) ids for the
    head history (default: PROBE_ROWS sequences drawn from the task, or the first batch
    of an iterator, which is then not trained on). Returns TrainResult(model, history).
    """
    from attnjax.lab.check import check_attention

    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"train({name}={value!r}): expected a positive integer.")
    if not lr > 0:
        raise ValueError(f"train(lr={lr!r}): expected a positive learning rate.")
    log_every = max(1, steps // LOG_POINTS) if log_every is None else int(log_every)
    if log_every < 1:
        raise ValueError(f"train(log_every={log_every}): expected a positive number of steps.")
    if isinstance(config_or_model, GPTConfig):
        model = LabModel.wrap(new_model(config_or_model, seed), config_or_model)
    elif isinstance(config_or_model, LabModel):
        model = config_or_model
    else:
        raise TypeError(f"train: expected a GPTConfig or a LabModel (a TrainResult's model); "
                        f"got {type(config_or_model).__name__}.")
    lab = model.lab_config
    if attention_impl is None:  # a LabModel goes on with the attention it was trained with
        attention_impl = model.attention_impl
    grouped = lab.kv_heads is not None and lab.kv_heads < lab.heads
    if attention_impl is None or isinstance(attention_impl, str):  # attnjax's kernels: "auto", "reference", ...
        impl = check_attention_impl("auto" if attention_impl is None else attention_impl)
    else:
        impl = check_attention(attention_impl, grouped=grouped)
    batches, task = batch_source(data, batch_size, seed)
    if task is not None:
        if task.vocab > lab.vocab:
            raise ValueError(f"data has {task.vocab} token ids but GPTConfig(vocab={lab.vocab}); raise vocab.")
        model = attach_tokenizer(model, task)
        if probe is None:
            probe_rows = min(batch_size, PROBE_ROWS)
            probe = task.probe_batch(probe_rows, seed + 1) if hasattr(task, "probe_batch") else \
                next(task.batches(probe_rows, seed + 1))
    if probe is None:
        probe = next(batches)
    probe = checked_batch(probe, lab.vocab, lab.context, 0)[:, :lab.context]
    model = dataclasses.replace(model, attention_impl=None if isinstance(impl, str) else impl)
    scores_impl = probe_impl(impl)
    if scores_impl is None:
        warnings.warn("attention_impl returns no attention probabilities and does not claim to be exact "
                      "(fn.exact = True); the history records the loss only. Return (out, probs) to see heads.")

    optimizer = make_optimizer(lr, steps, int(warmup) if warmup is not None else max(1, steps // 20))
    params = model.params
    opt_state = optimizer.init(params)
    keep = trainable_mask(params, lab.frozen_paths())

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(model, p, batch, impl))(params)
        grads = jax.tree.map(jnp.multiply, grads, keep)  # frozen paths get no update
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rows, window, tokens = [], [], 0
    started = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", file=sys.stderr, disable=not progress)
    for number in bar:
        try:
            batch = checked_batch(next(batches), lab.vocab, lab.context, number)
        except StopIteration:
            raise ValueError(f"data ran out after {number - 1} training batches; train(steps={steps}) needs "
                             f"{steps} (plus one for the probe when no probe is given).") from None
        params, opt_state, loss = step(params, opt_state, batch)
        window.append(float(loss))
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{window[-1]:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}", refresh=False)
        if number % log_every == 0 or number == steps:
            rows.append(history_rows(model, params, probe, scores_impl, number, tokens, elapsed, np.mean(window)))
            window = []
    bar.close()
    model.params = params  # this model is train's own copy (replaced above); keeps its compiled forward
    return TrainResult(model=model, history=pd.concat(rows, ignore_index=True))


def history_rows(model, params, probe, impl, number, tokens, elapsed, loss) -> pd.DataFrame:
    head = pd.DataFrame({"step": [number], "tokens": [tokens], "seconds": [elapsed], "loss": [float(loss)]})
    if impl is None:
        return head
    heads = probe_frame(model, params, probe, impl)
    return pd.concat([pd.concat([head] * len(heads), ignore_index=True), heads.reset_index(drop=True)], axis=1)


def first_step(history: pd.DataFrame, layer: int, category: str) -> Optional[int]:
    """The first logged step at which some head of ``layer`` is ``category`` (None: never)."""
    hits = history[(history["layer"] == layer) & (history["category"] == category)]
    return None if hits.empty else int(hits["step"].min())

