"""A small tokenizer over the ``tokenizers`` library: what attnjax needs, without transformers.

Importing transformers pulls in PyTorch and seconds of start-up; a checkpoint's
tokenizer.json holds everything attnjax uses. ``Tokenizer.from_directory`` reads it,
with the special tokens (bos/eos/pad/unk/sep/cls/mask and any extra ones) named in
tokenizer_config.json or special_tokens_map.json, as transformers reads them.
BOS/EOS/[CLS]/[SEP] are inserted by tokenizer.json's own post-processor (which is what
transformers v5 does with a tokenizer.json); truncation never cuts them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                             "cls_token", "mask_token")
# transformers' "no limit" sentinel for model_max_length
VERY_LARGE_INTEGER = int(1e30)


def token_content(value) -> Optional[str]:
    """A special token as stored in a config: a string, or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the transformers-style surface attnjax uses:
    ``tokenizer(texts, [pairs], truncation=, max_length=)``, ``decode``,
    ``convert_ids_to_tokens``, ``all_special_ids`` / ``all_special_tokens`` and the
    named special tokens (``pad_token``, ``eos_token_id``, ...)."""

    def __init__(self, backend, special_tokens: Dict[str, Optional[str]],
                 extra_special_tokens: Sequence[str] = (), *, model_max_length: Optional[int] = None,
                 clean_up_tokenization_spaces: bool = False, name_or_path: str = "",
                 chat_template: Optional[str] = None):
        self.backend = backend
        # The library's own settings would change results; attnjax pads and truncates itself.
        self.backend.no_padding()
        self.backend.no_truncation()
        self.special_tokens = {name: special_tokens.get(name) for name in SPECIAL_TOKENS_ATTRIBUTES}
        self.extra_special_tokens = [t for t in extra_special_tokens if t is not None]
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.name_or_path = name_or_path
        self.chat_template = chat_template  # Jinja source (attnjax.chat renders it), or None

    @classmethod
    def from_directory(cls, directory) -> "Tokenizer":
        """Read directory/tokenizer.json plus tokenizer_config.json and special_tokens_map.json."""
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        backend = Backend.from_file(str(directory / "tokenizer.json"))
        config = read_json(directory / "tokenizer_config.json")
        special_map = read_json(directory / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_TOKENS_ATTRIBUTES:
            value = config.get(name)
            if value is None:
                value = special_map.get(name)
            special[name] = token_content(value)
        extra = (config.get("extra_special_tokens") or config.get("additional_special_tokens")
                 or special_map.get("extra_special_tokens") or special_map.get("additional_special_tokens")
                 or [])
        if isinstance(extra, dict):  # v5 may store named extras as {name: token}
            extra = list(extra.values())
        max_length = config.get("model_max_length")
        if not isinstance(max_length, (int, float)) or max_length >= VERY_LARGE_INTEGER:
            max_length = None
        return cls(backend, special, [token_content(t) for t in extra],
                   model_max_length=int(max_length) if max_length is not None else None,
                   clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                   name_or_path=str(directory), chat_template=read_chat_template(directory, config))

    # -- special tokens -------------------------------------------------------------------

    def _id(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        found = self.backend.token_to_id(token)
        if found is None and self.special_tokens["unk_token"] is not None:
            found = self.backend.token_to_id(self.special_tokens["unk_token"])
        return found

    def __getattr__(self, name: str):
        # bos_token, eos_token_id, pad_token, pad_token_id, ... (only for the named tokens)
        if "special_tokens" not in self.__dict__:  # during copy / unpickling
            raise AttributeError(name)
        if name.endswith("_token_id") and name[: -len("_id")] in SPECIAL_TOKENS_ATTRIBUTES:
            return self._id(self.__dict__["special_tokens"][name[: -len("_id")]])
        if name in SPECIAL_TOKENS_ATTRIBUTES:
            return self.__dict__["special_tokens"][name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> Dict[str, str]:
        return {name: token for name, token in self.special_tokens.items() if token is not None}

    @property
    def all_special_tokens(self) -> List[str]:
        seen: List[str] = []
        for token in list(self.special_tokens.values()) + self.extra_special_tokens:
            if token is not None and token not in seen:
                seen.append(token)
        return seen

    @property
    def all_special_ids(self) -> List[int]:
        return [self._id(token) for token in self.all_special_tokens]

    # -- encoding and decoding --------------------------------------------------------------

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __call__(self, text, text_pair=None, *, truncation: bool = False,
                 max_length: Optional[int] = None, add_special_tokens: bool = True,
                 verbose: bool = True) -> Dict[str, list]:
        """Encode a string (or a pair) to a dict of lists, or a list of them (or of pairs)
        to a dict of lists of lists: input_ids, token_type_ids and attention_mask."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if text_pair is not None:
            pairs = [text_pair] if single else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs.")
            inputs = list(zip(texts, pairs))
        else:
            inputs = texts
        limit = max_length if max_length is not None else self.model_max_length
        if truncation and limit is not None:
            # longest_first, on the right, as transformers' truncation=True.
            self.backend.enable_truncation(int(limit))
        else:
            self.backend.no_truncation()
        try:
            encodings = self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        finally:
            self.backend.no_truncation()
        result = {
            "input_ids": [e.ids for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        if single:
            return {name: values[0] for name, values in result.items()}
        return result

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers skips the WordPiece clean-up for BPE models (it would eat real spaces).
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = clean_up_tokenization(text)
        return text

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._id(tokens)
        return [self._id(t) for t in tokens]

    def __repr__(self) -> str:
        return (f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={len(self)}, "
                f"special_tokens={self.special_tokens_map})")


def read_chat_template(directory: Path, config: dict) -> Optional[str]:
    """The checkpoint's chat template: chat_template.jinja, which overrides tokenizer_config's
    "chat_template" (a string, or named templates of which "default" is used), as transformers."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text
