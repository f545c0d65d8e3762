"""Tiny random Llama-like decoders built in code by transformers, saved with save_pretrained.

Each ``DECODERS`` entry is one family with the options worth checking switched on
(GQA / MQA, RoPE scaling, windows shorter than the test sequences, biases, q/k norms,
Gemma's norms and embedding scale, Gemma 2's soft-caps). The weights are drawn with a
larger spread than transformers' 0.02 so attention is peaked rather than uniform, and
every norm weight and bias is perturbed, so a swapped, dropped or mis-transposed key
changes the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tests.tiny_models import CORPUS

CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
}

# Special tokens (pad, bos, eos) and whether the post-processor adds BOS, as the real
# checkpoints do: Llama and Gemma add BOS, Qwen adds nothing and pads with EOS's text.
TOKENS = {
    "llama": ("<pad>", "<s>", "</s>", True),
    "mistral": ("<pad>", "<s>", "</s>", True),
    "qwen2": (None, None, "<|endoftext|>", False),
    "qwen3": (None, None, "<|endoftext|>", False),
    "gemma": ("<pad>", "<bos>", "<eos>", True),
    "gemma2": ("<pad>", "<bos>", "<eos>", True),
}

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
              initializer_range=0.25, attention_dropout=0.0)

DECODERS = {
    # GQA 4/2, all four attention biases, untied head, llama3 RoPE: head_dim 16 has
    # wavelengths 6.3 (kept), 20 and 63 (blended) and >= 199 (divided by the factor).
    "llama-gqa-llama3": ("llama", dict(
        hidden_size=64, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    # MQA (one kv head), tied head, linear RoPE scaling with another theta, three layers.
    "llama-mqa-linear-tied": ("llama", dict(
        num_key_value_heads=1, num_hidden_layers=3, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=5000.0, factor=2.0))),
    # A sliding window of 5 keys on every layer, shorter than the 12-token sequences.
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
    # q/k/v biases (o has none); windows of 4 from layer 1 on (max_window_layers=1).
    "qwen2-bias-window": ("qwen2", dict(
        num_key_value_heads=2, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
        max_window_layers=1)),
    # Per-head q/k norms; head_dim 16 with hidden 32 and 4 heads (q_proj widens to 64);
    # attention_bias; tied head.
    "qwen3-qknorm": ("qwen3", dict(
        num_key_value_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=True)),
    # (1 + w) norms, sqrt(hidden) embedding scale, tied head, MQA, explicit head_dim,
    # and the legacy hidden_act "gelu" that Gemma reads as the tanh GELU.
    "gemma": ("gemma", dict(num_key_value_heads=1, head_dim=16, hidden_act="gelu")),
    # Pre/post norms, soft-caps low enough to bite, query_pre_attn_scalar != head_dim,
    # and alternating windows of 4 (layers 0 and 2 slide, layer 1 sees everything).
    "gemma2": ("gemma2", dict(
        num_key_value_heads=2, head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=4.0, sliding_window=4)),
}


def decoder_tokenizer(family: str, vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS with the family's special tokens; BOS (where the
    family adds it) comes from the tokenizer.json post-processor, as in real checkpoints."""
    pad, bos, eos, add_bos = TOKENS[family]
    specials = [t for t in (pad, bos, eos) if t is not None]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    if add_bos:
        bos_id = bpe.token_to_id(bos)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                                pad_token=pad)


def build(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """The random *ForCausalLM of DECODERS[name] (eval mode, eager attention, float32)."""
    family, options = DECODERS[name]
    settings = dict(COMMON, **options)
    settings.update(overrides)
    torch.manual_seed(seed)
    config = CONFIG_CLASSES[family](**settings)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_norms_and_biases(model, seed)
    return model


def tiny_decoder(directory: Path, name: str, *, seed: int = 0, with_tokenizer: bool = True,
                 torch_dtype: Optional[torch.dtype] = None, max_shard_size: Optional[str] = None,
                 **overrides) -> torch.nn.Module:
    """Save DECODERS[name] (and its tokenizer) to directory; return the float32 torch model.

    torch_dtype: save the weights in this dtype (a bf16 checkpoint); the returned model
    is then transformers' own float32 load of that file (rounded weights, float32
    buffers such as Gemma's embedding scale). max_shard_size: save sharded.
    """
    model = build(name, seed=seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if torch_dtype is None:
        model.save_pretrained(directory, **kwargs)
    else:
        model.to(torch_dtype).save_pretrained(directory, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager").eval()
    if with_tokenizer:
        decoder_tokenizer(DECODERS[name][0], model.config.vocab_size).save_pretrained(directory)
    return model


def randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1 (Gemma's offsets at 0) and biases at 0: perturb them."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
