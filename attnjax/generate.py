"""Generation with a KV cache that records the attention each new token used.

    gen = attnjax.generate(model, "The cat", max_new_tokens=8, capture=Capture(attention=True))
    gen.text                  # the new text
    gen.trace.attention       # (layers, 1, heads, T, T) over prompt + new tokens

One compiled prefill writes the prompt into fixed-size key/value buffers
(attnjax.models.kv_cache) and one compiled decode step then costs one token each:
it writes the token's keys and values at its position and attends over the buffers.
Positions (GPT-2's learned ones, RoPE's angles) start at each step's offset; sliding
windows and soft-caps are the ports' own config fields, applied in the cached step
exactly as in the full forward.

Decoding follows transformers' generate: temperature 0 is greedy (argmax, the first
maximum on ties), so the ids equal ``generate(do_sample=False)`` token for token; with
temperature t > 0 the logits are divided by t, then top_k keeps the k largest (ties
with the k-th kept), then top_p keeps the smallest set of most likely tokens whose
probability reaches top_p (at least one), as transformers' TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper do, and a token is drawn with jax.random from
``seed`` (step s uses fold_in(PRNGKey(seed), s): the same seed gives the same tokens).
Generation stops after an end-of-sequence token (the checkpoint's
generation_config / config eos_token_id), after the token that completes a ``stop``
string (both kept in the output), or after max_new_tokens.

Cost: the cache holds bucket_length(prompt + max_new_tokens) positions (powers of two,
then multiples of 512), and the prompt is padded to its own bucket, so prompts and
lengths in one bucket reuse one compiled prefill and step. The prefill runs the
model's own attention on the prompt (the streaming kernel: no (prompt, prompt) matrix
unless Capture(attention=True) or scores are asked for), so a long prompt costs O(P)
attention memory with Capture(stats=True) or no capture; each decode step attends
over the cache densely, one (heads, 1, cache) row per layer. top_p keeps every token
tied with the last one kept (transformers cuts ties by sort order).

The trace: row i of every recorded array is query position i. Prompt rows come from
the prefill; row i of a generated position comes from the decode step that read token
i, so the row that chose new token s (0-based) is row prompt_length - 1 + s
(``Generation.choosing_rows``). After the last token one more step records its row, so
the trace covers the whole sequence and equals a full forward over ``ids``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.chat import is_messages, render_chat
from attnjax.models import kv_cache
from attnjax.models.attention import stack_layers, stack_records
from attnjax.models.checkpoints import module_for
from attnjax.models.common import is_decoder
from attnjax.tokenize import bucket_length, display_tokens, tokenize
from attnjax.trace import Capture, Trace

Prompt = Union[str, Sequence[dict], Sequence[int], np.ndarray]
STOP_REASONS = ("eos", "stop", "length")


@dataclasses.dataclass(frozen=True, eq=False)
class Generation:
    """A prompt and what the model wrote after it.

    ids (T,) int32: prompt then new tokens; tokens: each id as text; text: the new
    tokens decoded; new_tokens: the new tokens' strings; logits (steps, vocab) float32:
    the raw next-token logits each step chose from (before temperature and filters);
    trace: a Trace over all T positions (None without ``capture``); stop_reason: "eos",
    "stop" or "length"; prompt_text: the prompt as text (a rendered chat included;
    None for ids).
    """

    ids: np.ndarray
    prompt_length: int
    tokens: Tuple[str, ...]
    text: str
    new_tokens: Tuple[str, ...]
    logits: np.ndarray
    trace: Optional[Trace]
    stop_reason: str
    prompt_text: Optional[str] = None

    @property
    def steps(self) -> int:
        """The number of new tokens."""
        return len(self.ids) - self.prompt_length

    @property
    def new_ids(self) -> np.ndarray:
        return self.ids[self.prompt_length:]

    @property
    def choosing_rows(self) -> np.ndarray:
        """(steps,) the query position whose row chose each new token: prompt_length - 1 + s."""
        return self.prompt_length - 1 + np.arange(self.steps)


def prompt_ids(model, prompt: Prompt) -> Tuple[np.ndarray, Optional[str]]:
    """(ids (P,) int32, prompt text or None) for text, chat messages or token ids."""
    if isinstance(prompt, str):
        batch = tokenize(model, prompt, pad_to=None)
        return batch.input_ids[0][batch.attention_mask[0]].astype(np.int32), prompt
    if is_messages(prompt):
        from attnjax.chat import encode

        text = render_chat(model, prompt)
        ids, _ = encode(model, text, add_special_tokens=False)
        return ids, text
    try:
        ids = np.asarray(prompt)
    except (TypeError, ValueError):
        ids = None
    if ids is None or ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError("prompt must be a string, a list of {'role', 'content'} chat messages, or a 1-D "
                         f"sequence of token ids; got {type(prompt).__name__}"
                         + (f" with shape {ids.shape}" if ids is not None else "") + ".")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"prompt holds token id {int(ids.max() if ids.max() >= vocab else ids.min())}, outside "
                         f"the vocabulary (0..{vocab - 1}); were the ids made by another tokenizer?")
    return ids.astype(np.int32), None


def _check_options(max_new_tokens, temperature, top_k, top_p, stop, capture) -> Tuple[str, ...]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; give a positive number of tokens to generate.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}; give 0 (greedy) or a positive number (sampling).")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}; give a positive number of tokens, or None for no top-k filter.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}; give a probability in (0, 1], or None for no nucleus filter.")
    if capture is not None and not isinstance(capture, Capture):
        raise TypeError(f"capture must be an attnjax.Capture; got {type(capture).__name__}.")
    if capture is not None and capture.pool is not None:
        raise ValueError("generate records no pooled maps (Capture(pool=...)); use Capture(stats=True) for "
                         "streaming statistics per step.")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop={stop!r}; give a non-empty string or a list of them.")
    return stops


def choose_token(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """The next token from logits (V,): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) after top_k (0: off) and top_p (1: off) filtering."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)  # (V,)
    descending = jnp.sort(scaled)[::-1]  # (V,)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    scaled = jnp.where(scaled < descending[k - 1], -jnp.inf, scaled)  # (V,) top-k, ties kept
    ascending = jnp.sort(scaled)  # (V,)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending))  # (V,)
    removed = jnp.sum(cumulative[:-1] <= 1.0 - top_p)  # the least likely tokens, never the last one
    scaled = jnp.where(scaled < ascending[removed], -jnp.inf, scaled)  # (V,) nucleus
    sampled = jax.random.categorical(key, scaled)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("family", "config", "capture", "recorded", "prefill"),
                   donate_argnames=("cache",))
def advance(params, ids, length, offset, cache, seed, step, temperature, top_k, top_p, *,
            family, config, capture: Capture, recorded: Tuple[int, ...], prefill: bool = False):
    """Run ids (1, T) at positions offset.. through the cached model; choose the next token.

    length: how many of the T ids are real (a padded prompt; 1 for a decode step); the
    next token is chosen from the logits of the last real one. prefill: the prompt at
    offset 0, run with the model's own attention path (models.attention.attend_with_cache).
    Returns (token (), logits (V,), cache, records: the stacked arrays the capture asks for).
    """
    offset = 0 if prefill else offset  # a static 0: the layers know nothing is cached before the prompt
    mask = (jnp.arange(ids.shape[1]) < length)[None]  # (1, T)
    output, hidden_states, layer_records, cache = module_for(family, config).apply(
        {"params": params}, ids, mask, None, capture, recorded, "auto", None, logits="last",
        cache=cache, offset=offset)
    logits = output.logits[0].astype(jnp.float32)  # (V,)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    token = choose_token(logits, key, temperature, top_k, top_p)
    records = {name: stack_records(layer_records, name) for name in ("attention", "scores", "attention_output",
                                                                     "stats")}
    if capture.hidden_states:
        records["hidden_states"] = stack_layers(hidden_states)  # (L+1, 1, T, D)
    return token, logits, cache, {name: value for name, value in records.items() if value is not None}


def check_fits(model, prompt_length: int, max_new_tokens: int) -> None:
    limit = model.config.max_positions
    if prompt_length + max_new_tokens > limit:
        room = limit - prompt_length
        fits = (f"at most max_new_tokens={room} fit after it" if room > 0
                else "it does not fit at all; shorten the prompt")
        raise ValueError(f"The prompt has {prompt_length} tokens and max_new_tokens={max_new_tokens}, but "
                         f"{model.name or model.family} has {limit} positions: {fits}.")


def generate(model, prompt: Prompt, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             stop: Union[None, str, Sequence[str]] = None, capture: Optional[Capture] = None,
             progress: Optional[bool] = None) -> Generation:
    """Continue ``prompt`` with a decoder (GPT-2 or a Llama-like family), one cached step per token.

    prompt: a string (tokenised as ``attnjax.run`` does, BOS included where the
    tokenizer adds it), a list of {"role", "content"} messages (rendered with the
    checkpoint's chat template, its assistant header appended), or a 1-D sequence of
    token ids. Decoding, stopping and the trace: see the module docstring. capture:
    what the trace records, e.g. Capture(attention=True) for every row, or
    Capture(stats=True) for the streaming statistics of each step (O(T) per step);
    None records nothing (trace is None). progress: a tqdm bar over the steps
    (default: for 64 or more new tokens).
    """
    if not is_decoder(getattr(model, "family", "")):
        raise ValueError(f"generate needs a decoder (GPT-2 or a Llama-like model); {model.name or model.family} "
                         f"is a {model.family} encoder, which predicts no next token.")
    stops = _check_options(max_new_tokens, temperature, top_k, top_p, stop, capture)
    if stops and model.tokenizer is None:
        raise ValueError("stop strings need the model's tokenizer to read the new text; this model has none. "
                         "Stop on token ids by setting model.eos_token_ids instead.")
    ids, prompt_text = prompt_ids(model, prompt)
    prompt_length = len(ids)
    check_fits(model, prompt_length, max_new_tokens)
    config = model.config
    recording = capture is not None and (capture.records_layers or capture.hidden_states)
    capture = capture or Capture()
    recorded = capture.resolve_layers(config.num_layers)
    limit = config.max_positions
    size = bucket_length(prompt_length + max_new_tokens, limit)
    padded = bucket_length(prompt_length, limit)  # <= size: a new prompt length reuses the compiled prefill
    params = model.params
    dtype = jax.tree.leaves(params)[0].dtype
    kv_heads = getattr(config, "num_kv_heads", config.num_heads)
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_heads)
    cache = kv_cache.empty_cache(config.num_layers, 1, size, kv_heads, head_dim, dtype)
    statics = dict(family=model.family, config=config, capture=capture, recorded=recorded)
    sampling = (np.int32(seed), np.float32(temperature), np.int32(top_k or 0), np.float32(1.0 if top_p is None
                                                                                            else top_p))

    def run(token_ids, length, offset, cache, step, prefill=False):
        seed_, temperature_, top_k_, top_p_ = sampling
        return advance(params, token_ids, np.int32(length), np.int32(offset), cache, seed_, np.int32(step),
                       temperature_, top_k_, top_p_, prefill=prefill, **statics)

    first = np.zeros((1, padded), np.int32)
    first[0, :prompt_length] = ids
    token, logits, cache, records = run(first, prompt_length, 0, cache, 0, prefill=True)
    parts: List[Dict] = [jax.device_get(records)] if recording else []  # host copies: O(T) per step
    new_ids: List[int] = []
    step_logits = [logits]
    eos = set(model.eos_token_ids or _config_eos(config))
    show = progress if progress is not None else max_new_tokens >= 64
    from tqdm.auto import tqdm

    bar = tqdm(total=max_new_tokens, desc="attnjax generate", unit="token", leave=False, disable=not show)
    reason = "length"
    while True:
        new_ids.append(int(token))
        bar.update(1)
        if new_ids[-1] in eos:
            reason = "eos"
        elif stops and any(s in model.tokenizer.decode(new_ids) for s in stops):
            reason = "stop"
        if reason != "length" or len(new_ids) == max_new_tokens:
            break
        token, logits, cache, records = run(np.asarray([[new_ids[-1]]], np.int32), 1,
                                            prompt_length + len(new_ids) - 1, cache, len(new_ids))
        step_logits.append(logits)
        if recording:
            parts.append(jax.device_get(records))
    bar.close()
    if recording:  # the last token's own row: one more step, its choice unused
        _, _, cache, records = run(np.asarray([[new_ids[-1]]], np.int32), 1,
                                   prompt_length + len(new_ids) - 1, cache, len(new_ids))
        parts.append(jax.device_get(records))
    all_ids = np.concatenate([ids, np.asarray(new_ids, np.int32)])
    tokens = display_tokens(model.tokenizer, model.family, all_ids) if model.tokenizer is not None \
        else tuple(str(i) for i in all_ids)
    text = model.tokenizer.decode(new_ids) if model.tokenizer is not None else ""
    trace = assemble_trace(parts, prompt_length, all_ids, tokens, model, recorded) if recording else None
    return Generation(ids=all_ids, prompt_length=prompt_length, tokens=tokens, text=text,
                      new_tokens=tokens[prompt_length:], logits=np.stack(jax.device_get(step_logits)),
                      trace=trace, stop_reason=reason, prompt_text=prompt_text)


def _config_eos(config) -> Tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    return (eos,) if isinstance(eos, int) else ()


def assemble_trace(parts: List[Dict], prompt_length: int, ids: np.ndarray, tokens, model,
                   recorded: Tuple[int, ...]) -> Trace:
    """One Trace over all T positions from the prefill's records (its first
    prompt_length rows) and one record per decode step (one row each), all host arrays
    (assembled with numpy: no new XLA program per generation length)."""
    total = len(ids)

    def along(first: np.ndarray, rest: List[np.ndarray], axis: int, keys: bool = False) -> jax.Array:
        first = np.take(first, np.arange(prompt_length), axis=axis)  # the prefill's real rows
        joined = np.concatenate([first] + rest, axis=axis)
        return jnp.asarray(joined[..., :total] if keys else joined)  # keys: the cache's first T slots

    def rows(name, axis, keys=False):  # the prefill's real rows, then each step's row, along the query axis
        return along(parts[0][name], [p[name] for p in parts[1:]], axis, keys)

    present = parts[0]
    attention = rows("attention", 3, keys=True) if "attention" in present else None  # (L, 1, H, T, T)
    scores = rows("scores", 3, keys=True) if "scores" in present else None  # (L, 1, H, T, T)
    stats = None
    if "stats" in present:
        def field(name):
            if name == "received":  # column sums add up over the steps
                return jnp.asarray(sum(p["stats"].received for p in parts)[..., :total])  # (L, 1, H, T)
            return along(getattr(parts[0]["stats"], name), [getattr(p["stats"], name) for p in parts[1:]], 3)
        stats = type(present["stats"])(**{f.name: field(f.name) for f in dataclasses.fields(present["stats"])
                                          if f.name != "pooled"})
    windows = getattr(model.config, "windows", ())
    return Trace(
        mask=jnp.asarray(np.ones((1, total), bool)),
        input_ids=jnp.asarray(ids[None].astype(np.int32)),
        attention=attention,
        scores=scores,
        hidden_states=rows("hidden_states", 2) if "hidden_states" in present else None,
        attention_output=rows("attention_output", 2) if "attention_output" in present else None,
        stats=stats,
        layers=recorded if any(k in present for k in ("attention", "scores", "attention_output", "stats")) else (),
        windows=tuple(windows[i] for i in recorded) if windows and any(
            k in present for k in ("attention", "scores", "attention_output", "stats")) else (),
        tokens=(tuple(tokens),),
        causal=True,
    )
