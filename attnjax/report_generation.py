"""The report's generation sections (``attnjax report --generate N [--system TEXT]``).

The decoder continues the text for N tokens (greedy, attention recorded per step) and
the page gains: the generation view (each step's next-token bars and the attention of
the row that chose the token over the prompt) and the attention mass on each prompt
span by step and by layer. Spans: with --system, the system text and the user text
(chat messages through the checkpoint's template when it has one, else the two texts
joined by a blank line); without it, the first token (the attention sink) and the rest
of the prompt.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import attnjax
from attnjax.analysis import span_mass_by_step
from attnjax.chat import spans_from_chat, spans_from_text
from attnjax.models.common import is_decoder
from attnjax.trace import Capture
from attnjax.viz.generation import generation_frames, generation_view, span_mass_chart
from attnjax.viz.html import Block

TOP_K = 10


def generation_prompt(model, text: str, system: Optional[str]) -> Tuple[object, Optional[Dict], str]:
    """(prompt for attnjax.generate, character markers or None, how it was built)."""
    if system is None:
        return text, None, "the text as the prompt"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    if getattr(model.tokenizer, "chat_template", None):
        return messages, None, "system and user messages through the checkpoint's chat template"
    joined = f"{system}\n\n{text}"
    markers = {"system": (0, len(system)), "user": (len(system) + 2, len(joined))}
    return joined, markers, "the system text, a blank line, then the text (no chat template)"


def generation_sections(model, text: str, max_new_tokens: int, system: Optional[str] = None) -> List[Block]:
    """Generate after the text and return the page blocks. ValueError for bad input."""
    if not is_decoder(model.family):
        raise ValueError(f"--generate needs a decoder (GPT-2 or a Llama-like model); {model.name or model.family} "
                         f"is a {model.family} encoder, which predicts no next token.")
    prompt, markers, how = generation_prompt(model, text, system)
    generation = attnjax.generate(model, prompt, max_new_tokens=max_new_tokens, capture=Capture(attention=True))
    if isinstance(prompt, list):
        spans = spans_from_chat(prompt, model=model)
    elif markers is not None:
        spans = spans_from_text(prompt, markers, model=model)
    else:
        spans = {"first token": (0, 1), "rest of the prompt": (1, generation.prompt_length)}
        if generation.prompt_length == 1:
            spans = {"prompt": (0, 1)}
    frames = generation_frames(generation, k=TOP_K, decode=lambda i: model.tokenizer.decode([i]))
    mass = span_mass_by_step(generation.trace, spans, prompt_length=generation.prompt_length)
    per_step = mass[mass["head"] == -1].groupby(["key_span", "step"], sort=False)["mass"].mean()  # over layers
    first_last = "; ".join(f"{name}: {per_step[name].iloc[0]:.0%} at the first step, "
                           f"{per_step[name].iloc[-1]:.0%} at the last" for name in spans)
    span_list = ", ".join(f"{name} = tokens {a}..{b - 1}" for name, (a, b) in spans.items())
    return [
        Block("h2", "Generation", anchor="generation"),
        Block("note", f"Greedy continuation, {generation.steps} new tokens ({generation.stop_reason}); prompt: "
                      f"{how}, {generation.prompt_length} tokens."),
        Block("tokens", generation.text),
        Block("chart", generation_view(*frames)),
        Block("h2", "Prompt spans", anchor="spans"),
        Block("note", f"Spans: {span_list}. Mean over layers and heads: {first_last}."),
        Block("chart", span_mass_chart(mass)),
    ]
