"""GPTConfig: the shape of a small decoder to train, and a fresh model built from it.

A GPTConfig is written out as a Hugging Face config.json (``hf_config``) and read back
through the ports' own ``from_hf_config``, so what the lab trains is exactly a GPT-2
(``family="gpt2"``: learned positions, LayerNorm, GELU MLP) or a Llama
(``family="llama"``: RoPE, RMSNorm, SwiGLU MLP) that attnjax.load and transformers'
AutoModelForCausalLM both read.

``mlp=False`` gives an attention-only model (the setting of Olsson et al. 2022's
induction-head experiments) in a shape transformers still loads: the MLP keeps a
one-unit hidden layer whose output projection is zero and never trained
(``frozen_paths``), so every block adds exactly nothing from its MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from attnjax.models.checkpoints import module_for
from attnjax.models.gpt2 import GPT2Config
from attnjax.models.llama import LlamaConfig
from attnjax.models.model import Model
from attnjax.trace import Capture

FAMILIES = ("gpt2", "llama")
# Hidden units of a disabled MLP: one (transformers cannot build zero), its output zeroed.
NO_MLP_UNITS = 1
INIT_STD = 0.02  # GPT-2's initializer_range, for embeddings and projections


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A small decoder: ``layers`` blocks of ``heads`` heads over a ``width``-wide stream.

    vocab: token ids 0..vocab-1; context: the longest sequence (positions).
    mlp: False for an attention-only model (see the module docstring).
    family: "gpt2" or "llama". mlp_ratio: MLP hidden units per stream unit.
    kv_heads (llama): key/value heads for grouped-query attention (default: heads).
    """

    layers: int
    heads: int
    width: int
    vocab: int
    context: int
    mlp: bool = True
    family: str = "gpt2"
    mlp_ratio: int = 4
    kv_heads: Optional[int] = None

    def __post_init__(self):
        for name in ("layers", "heads", "width", "vocab", "context", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig({name}={value!r}): expected a positive integer.")
        if self.family not in FAMILIES:
            raise ValueError(f"GPTConfig(family={self.family!r}): expected one of {FAMILIES}.")
        if self.width % self.heads:
            raise ValueError(f"GPTConfig(width={self.width}, heads={self.heads}): width must be a multiple "
                             f"of heads (each head gets width // heads dimensions).")
        if self.family == "llama" and (self.width // self.heads) % 2:
            raise ValueError(f"GPTConfig: a llama head needs an even size for RoPE; width // heads = "
                             f"{self.width // self.heads}.")
        if self.kv_heads is not None:
            if self.family != "llama":
                raise ValueError("GPTConfig(kv_heads=...) is for family='llama'; GPT-2 has one kv head per head.")
            if self.kv_heads < 1 or self.heads % self.kv_heads:
                raise ValueError(f"GPTConfig(kv_heads={self.kv_heads}) must divide heads={self.heads}.")

    @property
    def hidden_units(self) -> int:
        return self.mlp_ratio * self.width if self.mlp else NO_MLP_UNITS

    def hf_config(self, **extra: Any) -> Dict[str, Any]:
        """The config.json dict transformers and attnjax.load read (dropout off, tied LM head)."""
        if self.family == "gpt2":
            config = dict(
                model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab,
                n_embd=self.width, n_layer=self.layers, n_head=self.heads, n_positions=self.context,
                n_inner=self.hidden_units, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_STD,
                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
        else:
            config = dict(
                model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=self.vocab,
                hidden_size=self.width, intermediate_size=self.hidden_units, num_hidden_layers=self.layers,
                num_attention_heads=self.heads, num_key_value_heads=self.kv_heads or self.heads,
                head_dim=self.width // self.heads, max_position_embeddings=self.context, rms_norm_eps=1e-5,
                rope_theta=10000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
                attention_dropout=0.0, initializer_range=INIT_STD, tie_word_embeddings=True,
                bos_token_id=0, eos_token_id=0)
        config.update(torch_dtype="float32", attnjax_lab=dataclasses.asdict(self), **extra)
        return config

    def port_config(self):
        """The attnjax port's config (GPT2Config or LlamaConfig) of this shape."""
        hf = self.hf_config()
        return GPT2Config.from_hf_config(hf) if self.family == "gpt2" else LlamaConfig.from_hf_config(hf)

    def frozen_paths(self) -> Tuple[Tuple[str, ...], ...]:
        """Parameter paths held at zero and never trained: a disabled MLP's output projection."""
        if self.mlp:
            return ()
        if self.family == "gpt2":
            return tuple((f"h_{i}", "mlp", "c_proj", leaf) for i in range(self.layers) for leaf in ("kernel", "bias"))
        return tuple((f"layers_{i}", "mlp", "down_proj", "kernel") for i in range(self.layers))


def init_params(config: GPTConfig, seed: int = 0):
    """Fresh parameters: normal(0, 0.02) weights (GPT-2's init), zero biases, unit norms;
    a disabled MLP's output projection zero."""
    port = config.port_config()
    module = module_for(config.family, port)
    ids = jnp.zeros((1, 2), jnp.int32)  # (B, T): the shapes only
    mask = jnp.ones((1, 2), bool)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, mask, ids, Capture(), ()))["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    frozen = set(config.frozen_paths())
    leaves = []
    for key, (path, leaf) in zip(keys, flat):
        names = tuple(k.key for k in path)
        if names[-1] in ("kernel", "embedding") and names not in frozen:
            leaves.append(INIT_STD * jax.random.normal(key, leaf.shape, jnp.float32))
        elif names[-1] == "scale":  # LayerNorm / RMSNorm weight
            leaves.append(jnp.ones(leaf.shape, jnp.float32))
        else:  # biases, frozen projections
            leaves.append(jnp.zeros(leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def new_model(config: GPTConfig, seed: int = 0, tokenizer=None, name: str = "") -> Model:
    """An untrained attnjax Model of this shape (random init from ``seed``)."""
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be an attnjax.lab.GPTConfig; got {type(config).__name__}.")
    return Model(family=config.family, config=config.port_config(), params=init_params(config, seed),
                 tokenizer=tokenizer, name=name or f"lab-{config.family}-{config.layers}x{config.heads}")
