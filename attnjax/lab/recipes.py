"""The recipes behind `attnjax lab induction` and `attnjax lab text`, and their head report.

Induction: a 2-layer, 4-head, attention-only Llama (RoPE) of width 64 on repeated random
tokens (64 ids, 64 positions, the repeat at a moving offset: tasks.RepeatedTokens),
batch 32, AdamW at 3e-3, 2000 steps. Measured on a 2-core CPU (benchmarks/lab.py): the
layer-1 induction heads and the layer-0 previous-token head appear together after
about 500 steps (the phase change of Olsson et al. 2022, where the loss drops from
about ln 64 to about half of it). RoPE matters: with GPT-2's learned positions a 1000-step
run stayed on the plateau (each position has to learn "look one back" on its own).
The context is 512 positions (RoPE adds no weights for them), so `attnjax report
--model DIR` reads its default 484-character example as it is.

Text: a 2-layer, 4-head Llama of width 64 with MLPs on 128-character windows of the
file, batch 16, AdamW at 3e-3, 1000 steps (0.24 s a step on the 2-core CPU at load 8;
width 128 and batch 32 took 1.0 s).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from attnjax.lab.config import GPTConfig
from attnjax.lab.tasks import char_text, repeated_tokens
from attnjax.lab.train import TrainResult, first_step, probe_frame, train

CONTEXT = 512


@dataclasses.dataclass(frozen=True)
class Recipe:
    config: GPTConfig
    length: int
    steps: int
    batch_size: int = 32
    lr: float = 3e-3


INDUCTION = Recipe(GPTConfig(layers=2, heads=4, width=64, vocab=64, context=CONTEXT, mlp=False, family="llama"),
                   length=64, steps=2000)
TEXT = Recipe(GPTConfig(layers=2, heads=4, width=64, vocab=2, context=CONTEXT, mlp=True, family="llama"),
              length=128, steps=1000, batch_size=16)  # vocab: the file's, set by train_text


def train_induction(steps: Optional[int] = None, *, seed: int = 0, recipe: Recipe = INDUCTION,
                    progress: bool = True, log_every: Optional[int] = None) -> TrainResult:
    task = repeated_tokens(recipe.config.vocab, recipe.length)
    steps = steps or recipe.steps
    return train(recipe.config, task, steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                 log_every=log_every or max(1, steps // 40), progress=progress)


def train_text(path, steps: Optional[int] = None, *, seed: int = 0, recipe: Recipe = TEXT,
               progress: bool = True) -> TrainResult:
    task = char_text(path, recipe.length)
    config = dataclasses.replace(recipe.config, vocab=task.vocab)
    steps = steps or recipe.steps
    return train(config, task, steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                 log_every=max(1, steps // 40), progress=progress)


def fresh_heads(result: TrainResult, ids: np.ndarray) -> pd.DataFrame:
    """Every head's scores and category on ids (B, T) the model was not trained on."""
    model = result.model
    return probe_frame(model, model.params, np.asarray(ids, np.int32), model.impl)


def induction_probe(vocab: int = INDUCTION.config.vocab, length: int = INDUCTION.length, rows: int = 16,
                    seed: int = 12345) -> np.ndarray:
    """(rows, length) fresh sequences (a seed training never uses): a random first half,
    then the same half again."""
    return repeated_tokens(vocab, length).probe_batch(rows, seed)


def head_report(result: TrainResult, heads: pd.DataFrame) -> str:
    """A text report: the category grid (layer x head), the strongest previous-token and
    induction heads, and the first logged step each category appeared in each layer."""
    grid = heads.pivot(index="layer", columns="head", values="category")
    lines = ["Head categories on fresh sequences (rows: layers, columns: heads):",
             grid.to_string(), ""]
    for column, label in (("previous_token", "previous-token"), ("induction", "induction")):
        if column in heads and heads[column].notna().any():
            best = heads.loc[heads[column].idxmax()]
            lines.append(f"Strongest {label} head: layer {int(best['layer'])} head {int(best['head'])}, "
                         f"score {best[column]:.2f}")
    history = result.history
    if "category" in history:
        for layer in sorted(heads["layer"].unique()):
            found = sorted(set(heads.loc[heads["layer"] == layer, "category"]) - {"broad", "mixed", "local"})
            for category in found:
                step = first_step(history, int(layer), category)
                when = f"first seen at step {step}" if step is not None else "not seen in the history"
                lines.append(f"Layer {int(layer)} {category} head: {when}.")
    losses = history.drop_duplicates("step")
    lines.append(f"Loss: {losses['loss'].iloc[0]:.3f} at step {int(losses['step'].iloc[0])} -> "
                 f"{losses['loss'].iloc[-1]:.3f} at step {int(losses['step'].iloc[-1])}.")
    return "\n".join(lines)


def save_result(result: TrainResult, directory) -> Path:
    """The model (Hugging Face layout) and its history (history.csv) in ``directory``."""
    directory = result.model.save(directory)
    result.history.to_csv(directory / "history.csv", index=False)
    return directory


__all__ = ["INDUCTION", "TEXT", "Recipe", "fresh_heads", "head_report", "induction_probe",
           "save_result", "train_induction", "train_text"]
