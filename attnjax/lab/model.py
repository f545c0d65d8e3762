"""LabModel: a trained lab model that saves in Hugging Face layout and loads back.

``LabModel.save(dir)`` writes config.json (transformers' GPT-2 or Llama config, plus
``attnjax_lab``: the GPTConfig, and ``attnjax_attention_impl``: the attention function's
spec), model.safetensors (the checkpoint keys transformers uses; the tied LM head is not
stored) and, when the model has a tokenizer, tokenizer.json + tokenizer_config.json.
``attnjax.load(dir)`` and transformers' AutoModelForCausalLM read the directory as any
GPT-2 / Llama checkpoint.

The attention function is code, not weights. It is re-attached on load by its spec: a
"module:name" (or "module:factory(args)", e.g. "attnjax.lab.attention:sliding_window(8)")
string, taken from ``fn.spec`` when set, else from the function's module and name when
that imports back to the same function. ``attnjax.lab.load(dir)`` imports it and returns
the model with ``attention_impl`` set; pass ``attention_impl=model.impl`` to forward.
For a function without an importable name (a lambda, a closure), pass it yourself:
``attnjax.lab.load(dir, attention_impl=fn)``. ``attnjax.load(dir)`` (and transformers)
always run softmax attention.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from attnjax.models.checkpoints import BASE_PREFIX, hf_name, needs_transpose, read_config
from attnjax.models.model import Model

LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
IMPL_KEY = "attnjax_attention_impl"
CONFIG_KEY = "attnjax_lab"


@dataclasses.dataclass(eq=False)
class LabModel(Model):
    """An attnjax Model built from a GPTConfig (``lab_config``), with the attention
    function it was trained with (``attention_impl``: None for softmax)."""

    lab_config: Any = None
    attention_impl: Any = None

    @classmethod
    def wrap(cls, model: Model, lab_config, attention_impl=None) -> "LabModel":
        return cls(family=model.family, config=model.config, params=model.params, tokenizer=model.tokenizer,
                   name=model.name, lab_config=lab_config, attention_impl=attention_impl)

    @property
    def impl(self):
        """What to pass as forward's attention_impl: the trained function, or "auto"."""
        return "auto" if self.attention_impl is None else self.attention_impl

    def save(self, directory) -> Path:
        """Write the Hugging Face layout (module docstring) into ``directory``; returns it."""
        return save(self, directory)


def impl_spec(fn) -> Optional[str]:
    """The importable spec of an attention function, or None when it has none."""
    spec = getattr(fn, "spec", None)
    if isinstance(spec, str):
        return spec
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not name or "<" in name:
        return None
    spec = f"{module}:{name}"
    try:
        return spec if resolve_impl(spec) is fn else None
    except (ImportError, AttributeError, ValueError):
        return None


def resolve_impl(spec: str):
    """Import "module:name" or "module:factory(literal args)"."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"attention impl spec {spec!r}: expected 'module:name' or 'module:factory(args)'.")
    target = importlib.import_module(module_name)
    call = name.endswith(")") and "(" in name
    path, args = (name[: name.index("(")], name[name.index("(") + 1: -1]) if call else (name, "")
    for part in path.split("."):
        target = getattr(target, part)
    return target(*ast.literal_eval(f"({args},)")) if call and args else (target() if call else target)


def state_dict(model: Model) -> dict:
    """Flax params -> {checkpoint key: numpy array} in transformers' naming and layout."""
    import jax

    prefix = BASE_PREFIX[model.family]
    tensors = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        path = tuple(k.key for k in keys)
        value = np.asarray(leaf, np.float32)
        if needs_transpose(model.family, path):
            value = value.T
        name = f"{hf_name(path)}.{LEAF_NAMES[path[-1]]}"
        tensors[name if name.startswith("lm_head.") else prefix + name] = np.ascontiguousarray(value)
    return tensors


def save(model: LabModel, directory) -> Path:
    from safetensors.numpy import save_file

    if not isinstance(model, LabModel) or model.lab_config is None:
        raise TypeError("save: expected a LabModel built by attnjax.lab (train's result.model).")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = None if model.attention_impl is None else impl_spec(model.attention_impl)
    if model.attention_impl is not None and spec is None:
        spec = f"<not importable: {getattr(model.attention_impl, '__name__', repr(model.attention_impl))}>"
    config = model.lab_config.hf_config(**{IMPL_KEY: spec})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None and hasattr(model.tokenizer, "backend"):
        model.tokenizer.backend.save(str(directory / "tokenizer.json"))
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **model.tokenizer.special_tokens_map,
                            "model_max_length": model.tokenizer.model_max_length or model.config.max_positions,
                            "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return directory


def load(directory, attention_impl=None) -> LabModel:
    """A LabModel from a directory ``save`` wrote, with its attention function re-attached
    (module docstring); ``attention_impl`` overrides the saved spec."""
    import attnjax
    from attnjax.lab.config import GPTConfig

    hf = read_config(Path(directory))
    if CONFIG_KEY not in hf:
        raise ValueError(f"{directory}: config.json has no {CONFIG_KEY!r}; it was not saved by attnjax.lab. "
                         "Load it with attnjax.load instead.")
    lab_config = GPTConfig(**hf[CONFIG_KEY])
    spec = hf.get(IMPL_KEY)
    if attention_impl is None and spec is not None:
        if spec.startswith("<"):
            raise ValueError(f"{directory} was trained with an attention function that has no importable name "
                             f"({spec}); pass it: attnjax.lab.load({str(directory)!r}, attention_impl=fn).")
        attention_impl = resolve_impl(spec)
    return LabModel.wrap(attnjax.load(directory), lab_config, attention_impl)


def attach_tokenizer(model: LabModel, task) -> LabModel:
    """The model with a character-level tokenizer over the task's symbols (if it has any)."""
    from attnjax.lab.tasks import UNK, char_tokenizer
    from attnjax.tokenizer import Tokenizer

    symbols = getattr(task, "symbols", None)
    if symbols is None:
        return model
    backend, config = char_tokenizer(symbols, model.config.max_positions)
    tokenizer = Tokenizer(backend, {"unk_token": UNK, "pad_token": UNK},
                          model_max_length=config["model_max_length"])
    return dataclasses.replace(model, tokenizer=tokenizer)
