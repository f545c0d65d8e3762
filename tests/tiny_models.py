"""Tiny random Hugging Face models built in code, saved with save_pretrained.

No GPT-2 weights can be downloaded here, so GPT-2 (and small BERT variants) are
tested on random models that transformers itself builds and saves; attnjax must
load them exactly as it would load a real checkpoint from the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need, or so they say.",
    "A cat sat on the mat; the mat was warm.",
    "Heads look at the previous token, the first token, or everywhere.",
    "Induction heads copy what came after an earlier occurrence.",
]


def gpt2_tokenizer(vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS, wrapped as GPT-2's tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return transformers.GPT2TokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_gpt2(directory: Path, *, seed: int = 0, with_tokenizer: bool = True, **overrides):
    """Save a random GPT2LMHeadModel (and tokenizer) to directory; return the torch model."""
    tokenizer = gpt2_tokenizer() if with_tokenizer else None
    settings = dict(
        vocab_size=len(tokenizer) if tokenizer else 300, n_positions=64, n_embd=32, n_layer=2,
        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**settings)
    model = transformers.GPT2LMHeadModel(config, ).eval()
    model.config._attn_implementation = "eager"
    randomize_layer_norms(model, seed)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return model


def tiny_bert(directory: Path, *, seed: int = 0, tokenizer_from: Path | None = None, **overrides):
    """Save a random BertModel to directory; copy a tokenizer in when given one."""
    settings = dict(
        vocab_size=30522 if tokenizer_from else 120, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    config = transformers.BertConfig(**settings)
    model = transformers.BertModel(config).eval()
    model.config._attn_implementation = "eager"
    randomize_layer_norms(model, seed)
    model.save_pretrained(directory)
    if tokenizer_from is not None:
        transformers.AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(directory)
    return model


def randomize_layer_norms(model: torch.nn.Module, seed: int) -> None:
    """Biases start at 0 and LayerNorm weights at 1; perturb them so a swapped or
    dropped key changes the numbers."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or "LayerNorm" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
