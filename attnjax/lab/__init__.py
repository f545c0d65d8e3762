"""attnjax.lab: train a small GPT with your own attention, check it, and watch heads form.

    from attnjax import lab
    config = lab.GPTConfig(layers=2, heads=4, width=64, vocab=64, context=512, mlp=False, family="llama")
    result = lab.train(config, lab.tasks.repeated_tokens(vocab=64, length=64), steps=2000, batch_size=32,
                       lr=3e-3, attention_impl=None)      # or lab.attention.alibi, or your own function
    result.history            # step, loss, and every head's scores and category over training
    result.model.save("induction-model")    # Hugging Face layout; attnjax.load / transformers read it

GPTConfig (config.py), train (train.py), tasks (tasks.py), check_attention (check.py),
reference attention variants (attention.py), LabModel save / load (model.py), the
recipes behind `attnjax lab` (recipes.py).
"""

from attnjax.lab import attention, tasks
from attnjax.lab.check import AttentionCheckError, check_attention
from attnjax.lab.config import GPTConfig, new_model
from attnjax.lab.model import LabModel, load
from attnjax.lab.train import TrainResult, first_step, train

__all__ = ["AttentionCheckError", "GPTConfig", "LabModel", "TrainResult", "attention", "check_attention",
           "first_step", "load", "new_model", "tasks", "train"]
