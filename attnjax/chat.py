"""Prompts for generation: chat messages through the checkpoint's template, and token spans.

``render_chat`` renders a list of {"role", "content"} messages with the checkpoint's
own chat template (chat_template.jinja, or tokenizer_config.json's "chat_template"),
through transformers' Jinja renderer (a sandboxed environment with its filters and
globals; it imports neither torch nor transformers' tokenizer classes), with the
tokenizer's special tokens as template variables, exactly as
``tokenizer.apply_chat_template`` does. The rendered text is then encoded without
adding special tokens (the template writes them), as apply_chat_template(tokenize=True).

Spans are half-open token ranges (start, end) over a prompt's token positions, the
input of ``attnjax.analysis.span_attention``: ``spans_from_text`` turns character
ranges of a text into token ranges through the tokenizer's offsets (a token belongs
to a span when its characters overlap the range); ``spans_from_chat`` gives each
message's content its span, named by role.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

Span = Tuple[int, int]
Messages = Sequence[Mapping[str, str]]


def _tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{getattr(model, 'name', '') or 'This model'} has no tokenizer files; pass token ids "
                         "instead of text, or add tokenizer.json to the checkpoint directory.")
    return tokenizer


def is_messages(prompt) -> bool:
    """True for a list of chat messages (dicts), False for text or token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, Mapping) for m in prompt)


def check_messages(messages) -> List[Dict[str, str]]:
    if not is_messages(messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, e.g. "
                         "[{'role': 'user', 'content': 'Hello'}].")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] is {dict(message)!r}; each message needs a string 'role' "
                             "('system', 'user', 'assistant') and a string 'content'.")
        checked.append(dict(message))
    return checked


def render_chat(model, messages: Messages, *, add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` under the checkpoint's chat template.

    add_generation_prompt: end with the template's assistant header, so the model's
    next tokens are the answer (transformers' option of the same name).
    """
    tokenizer = _tokenizer(model)
    messages = check_messages(messages)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"{getattr(model, 'name', '') or 'This model'}'s tokenizer has no chat template "
                         "(chat_template.jinja or tokenizer_config.json's chat_template); pass the prompt "
                         "as a string instead of messages.")
    from transformers.utils.chat_template_utils import render_jinja_template  # lazy: no torch

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        **tokenizer.special_tokens_map)
    return rendered[0]


def encode(model, text: str, *, add_special_tokens: bool) -> Tuple[np.ndarray, List[Span]]:
    """Token ids (T,) int32 and each token's character range in ``text``."""
    tokenizer = _tokenizer(model)
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        raise ValueError("Token offsets need attnjax's tokenizer.json tokenizer; this checkpoint's tokenizer "
                         "was read by transformers. Save it as tokenizer.json.")
    encoding = backend.encode(text, add_special_tokens=add_special_tokens)
    return np.asarray(encoding.ids, np.int32), [tuple(o) for o in encoding.offsets]


def _token_span(offsets: Sequence[Span], start: int, end: int, special: Sequence[bool]) -> Span:
    """The tokens whose characters overlap [start, end): (first, last + 1); empty -> error."""
    hits = [i for i, (a, b) in enumerate(offsets) if not special[i] and a < end and b > start]
    if not hits:
        raise ValueError(f"Characters {start}..{end} hold no token; mark a range that covers some text.")
    return hits[0], hits[-1] + 1


def spans_from_text(text: str, markers: Mapping[str, Union[Span, str]], *, model,
                    add_special_tokens: bool = True) -> Dict[str, Span]:
    """Token spans of character ranges of ``text``, tokenised as ``attnjax.run`` does.

    markers: name -> (start, end) character range (half-open), or name -> a substring
    (its first occurrence). Returns name -> (first token, last token + 1): every token
    whose characters overlap the range (a token straddling the edge is included).
    add_special_tokens: False for a text that already holds them (a rendered chat).
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string.")
    if not isinstance(markers, Mapping) or not markers:
        raise ValueError("markers must be a non-empty dict of name -> (start, end) or name -> substring.")
    ids, offsets = encode(model, text, add_special_tokens=add_special_tokens)
    special_ids = set(_tokenizer(model).all_special_ids)
    special = [int(i) in special_ids and a == b for i, (a, b) in zip(ids, offsets)]
    spans = {}
    for name, marker in markers.items():
        if isinstance(marker, str):
            start = text.find(marker)
            if not marker or start < 0:
                raise ValueError(f"markers[{name!r}]: {marker!r} does not occur in the text.")
            start, end = start, start + len(marker)
        else:
            try:
                start, end = (int(v) for v in marker)
            except (TypeError, ValueError):
                raise ValueError(f"markers[{name!r}] is {marker!r}; give (start, end) characters or a "
                                 "substring.") from None
            if not 0 <= start < end <= len(text):
                raise ValueError(f"markers[{name!r}] = ({start}, {end}) is outside the text's "
                                 f"{len(text)} characters; need 0 <= start < end <= {len(text)}.")
        try:
            spans[str(name)] = _token_span(offsets, start, end, special)
        except ValueError as error:
            raise ValueError(f"markers[{name!r}]: {error}") from None
    return spans


def spans_from_chat(messages: Messages, *, model, add_generation_prompt: bool = True) -> Dict[str, Span]:
    """Token spans of each message's content in the rendered chat prompt, named by role.

    The prompt is what ``attnjax.generate(model, messages)`` feeds the model. A role
    that occurs more than once gets numbered names after the first ("user",
    "user_2", ...). Spans cover the content's tokens, not the template's role headers.
    """
    messages = check_messages(messages)
    text = render_chat(model, messages, add_generation_prompt=add_generation_prompt)
    markers, seen, cursor = {}, {}, 0
    for i, message in enumerate(messages):
        content = message["content"]
        start = text.find(content, cursor) if content else -1
        if start < 0:
            stripped = content.strip()
            start = text.find(stripped, cursor) if stripped else -1
            content = stripped
        if start < 0:
            continue  # empty, or rewritten by the template: no span
        seen[message["role"]] = seen.get(message["role"], 0) + 1
        name = message["role"] if seen[message["role"]] == 1 else f"{message['role']}_{seen[message['role']]}"
        markers[name] = (start, start + len(content))
        cursor = start + len(content)
    if not markers:
        raise ValueError("No message's content appears in the rendered chat; the template rewrote them all.")
    return spans_from_text(text, markers, model=model, add_special_tokens=False)
