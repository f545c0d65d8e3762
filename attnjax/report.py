"""The report: a model and a text in, one self-contained HTML page out.

``build_report`` runs the model, the analyses of attnjax.analysis and the chart
builders, timing each stage; ``Report.save`` writes the page with save_html.

Sections: what was run (model, sizes, tokens), the model overview, the head
taxonomy, layer similarity and focus, token flow for one token, anomalies with
their reasons, the next-token explorer (GPT-2 models), when asked the comparison
with a second text or model, and, from attnjax.report_inside, one head opened up
(head view, step-by-step attention for --token, query/key map) and the model's
structure.

Long inputs: the overview draws full maps while layers x heads x tokens^2 stays
within OVERVIEW_MAX_WEIGHTS (a BERT-base-sized model at 128 tokens; 181 tokens
for the 72-head MiniLM). Beyond that it draws the pooled POOL_BINS x POOL_BINS
maps of the streaming statistics and says so; beyond FULL_ATTENTION_TOKENS no
T x T map is kept at all, and the analyses that need maps (token flow) are left out
with a note.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np
import pandas as pd

import attnjax
from attnjax import analysis
from attnjax.models.common import is_decoder
from attnjax.report_inside import inside_blocks, overview_start
from attnjax.trace import Capture, Trace
from attnjax.viz.overview import model_overview
from attnjax.viz.frames import OVERVIEW_MAX_WEIGHTS, attention_frame, next_token_frames, sequence_tokens, truncate
from attnjax.viz.grids import anomaly_chart, comparison_chart, taxonomy_chart
from attnjax.viz.html import Block, save_html
from attnjax.viz.layers import focus_chart, layer_similarity_chart, token_flow_chart
from attnjax.viz.next_token import VISIBLE_SPACE, next_token_explorer

POOL_BINS = 64                 # pooled map size for long inputs
FULL_ATTENTION_TOKENS = 512    # above this, only streaming statistics are captured
LONG_INPUT_TOKENS = 256        # above this, a progress bar is shown
TOP_K_NEXT = 12                # next-token explorer bars
SPECIAL_TOKENS = {"[CLS]", "[SEP]", "[PAD]", "<|endoftext|>", "<s>", "</s>"}
ALL_HEADS = analysis.ALL_HEADS  # head index of a whole-layer row


class ReportInputError(ValueError):
    """Input the report cannot use (empty text, unknown token, too long): says what to do."""


@dataclasses.dataclass
class Report:
    """A built report: title, page blocks, stage timings (seconds) and what was run."""

    title: str
    blocks: List[Block]
    timings: Dict[str, float]
    summary: Dict[str, Any]

    def save(self, path: Union[str, Path]) -> Path:
        """Write the page (self-contained HTML) to ``path``."""
        return save_html(self, path)


class Stages:
    """Times named stages; optionally advances a progress bar over them."""

    def __init__(self, count: int, progress: bool, on_stage: Optional[Callable[[str], None]] = None):
        self.timings: Dict[str, float] = {}
        self.on_stage = on_stage
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=count, desc="attnjax report", unit="stage", leave=False)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        if self.on_stage is not None:
            self.on_stage(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def full_map_tokens(num_layers: int, num_heads: int) -> int:
    """The most tokens whose full maps fit the overview budget for this model size."""
    return int(math.isqrt(OVERVIEW_MAX_WEIGHTS // max(num_layers * num_heads, 1)))


def count_tokens(model, text: str, pair: Optional[str] = None) -> int:
    """Tokens the model's tokenizer makes of ``text`` (and the pair's second sentence
    ``pair``), special tokens included."""
    return len(model.tokenizer(text, pair, truncation=False, verbose=False)["input_ids"])


def choose_token(tokens: Sequence[str], positions: np.ndarray, token: Union[int, str, None],
                 special: Collection[str] = SPECIAL_TOKENS) -> int:
    """Position for the token-flow chart: an int position (negative: counted from the
    end, -1 the last token), the first token matching a string, or by default the last
    token that is not special (``special``: token strings, e.g. the model tokenizer's
    special tokens) or punctuation."""
    if isinstance(token, (int, np.integer)):
        if -len(positions) <= int(token) < 0:  # counted from the end: -1 is the last token
            return int(positions[int(token)])
        if int(token) not in set(int(p) for p in positions):
            raise ReportInputError(f"--token {token} is not a token position; the text has positions "
                                   f"{int(positions[0])}..{int(positions[-1])} (or -1..-{len(positions)} "
                                   "from the end).")
        return int(token)
    if isinstance(token, str) and token.strip():
        wanted = token.strip().lower()
        for position, text in zip(positions, tokens):
            if _plain_token(text) == wanted:
                return int(position)
        shown = ", ".join(truncate(t, 16) for t in tokens[:20])
        raise ReportInputError(f"Token {token!r} is not in the text; its tokens are: {shown}"
                               f"{' ...' if len(tokens) > 20 else ''}. Pass a position number instead.")
    for position, text in reversed(list(zip(positions, tokens))):
        plain = _plain_token(text)
        if text not in special and any(ch.isalnum() for ch in plain):
            return int(position)
    return int(positions[-1])


def _plain_token(text: str) -> str:
    return str(text).strip().removeprefix("##").removeprefix("\u0120").lower()


@dataclasses.dataclass
class Results:
    """Everything the page shows, computed before any chart is built."""

    model: Any
    model_b: Any
    text: str
    pair: Optional[str]                        # a BERT pair's second sentence, or None
    compare_text: Optional[str]
    max_length: Optional[int]
    trace: Trace
    mode: str                                  # "full", "pooled overview" or "statistics only"
    positions: np.ndarray                      # (n,) non-padding positions
    tokens: Tuple[str, ...]                    # (n,) their tokens
    position: int                              # the token-flow token
    heads: pd.DataFrame                        # classify_heads(head_scores(trace))
    similarity: pd.DataFrame
    focus: pd.DataFrame
    flow: Optional[pd.DataFrame]               # token_flow, None without maps
    rollout: Optional[pd.DataFrame]            # rollout_frame rows of the token
    anomalies: pd.DataFrame                    # flagged rows of detect_anomalies
    changes: Optional[pd.DataFrame] = None     # compare, when asked for
    compare_labels: Tuple[str, str] = ("A", "B")
    other: Optional[Trace] = None              # the comparison's Trace B
    other_heads: Optional[pd.DataFrame] = None  # classify_heads(head_scores(other))
    too_short: Dict[str, str] = dataclasses.field(default_factory=dict)  # anomaly kinds without a verdict
    segments: Optional[np.ndarray] = None      # (n,) segment id of each token of a pair
    next_token: Optional[Tuple[pd.DataFrame, pd.DataFrame]] = None


def build_report(
    model: Any,
    text: str,
    *,
    pair: Optional[str] = None,
    compare_text: Optional[str] = None,
    model_b: Any = None,
    max_length: Optional[int] = None,
    token: Union[int, str, None] = None,
    scheme: str = "viridis",
    scale: str = "linear",
    progress: Optional[bool] = None,
    on_stage: Optional[Callable[[str], None]] = None,
    generate: Optional[int] = None,
    system: Optional[str] = None,
) -> Report:
    """Run ``model`` on ``text`` and build the report (see the module docstring).

    model, model_b: an attnjax Model or anything attnjax.load takes ("minilm", a
    directory, a hub id). pair: a BERT sentence pair's second sentence: the model reads
    [CLS] text [SEP] pair [SEP] with segment ids 0 / 1 (a decoder refuses it). compare_text / model_b: add the comparison section
    (compare_text through model_b, or through model; text through model_b).
    max_length: truncate to this many tokens (over-long text is an error without it).
    token: position (int) or token text for the token-flow chart. progress: show a
    progress bar (default: for inputs over LONG_INPUT_TOKENS tokens). on_stage:
    called with each stage's name as it starts. generate: also continue the text for this
    many tokens and add the generation sections (decoders; attnjax.report_generation),
    with ``system`` as a system prompt.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReportInputError("The text is empty; give some words with --text or --file.")
    if compare_text is not None and not compare_text.strip():
        raise ReportInputError("The comparison text is empty; give some words with --compare.")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise ReportInputError("The pair's second sentence is empty; give some words with --pair.")
    if pair is not None and compare_text is not None:
        raise ReportInputError("A sentence pair cannot be compared with a single --compare text; use model_b.")
    comparing = compare_text is not None or model_b is not None
    load_timings = {}
    for label, which in (("load model", model), ("load model B", model_b)):
        if which is not None and not hasattr(which, "forward"):
            start = time.perf_counter()
            loaded = attnjax.load(which)
            load_timings[label] = time.perf_counter() - start
            model, model_b = (loaded, model_b) if label == "load model" else (model, loaded)

    if pair is not None and is_decoder(model.family):
        raise ReportInputError(f"A sentence pair (--pair) is a BERT input; {model.family} reads one text: put "
                               "both sentences in the text.")
    n_tokens = count_tokens(model, text, pair)
    limit = model.config.max_positions
    if max_length is None and n_tokens > limit:
        raise ReportInputError(f"The text is {n_tokens} tokens, more than the model's {limit} positions; "
                               f"pass max_length (--max-length {limit}) to truncate it.")
    n_used = min(n_tokens, max_length) if max_length is not None else n_tokens
    show_progress = n_used > LONG_INPUT_TOKENS if progress is None else progress
    if generate is not None and not is_decoder(model.family):
        raise ReportInputError(f"--generate needs a decoder (GPT-2 or a Llama-like model); {model.name or model.family}"
                               f" is a {model.family} encoder, which predicts no next token.")
    stages = Stages(7 + comparing + (generate is not None), progress=show_progress, on_stage=on_stage)
    stages.timings.update(load_timings)
    try:
        results = _analyse(model, model_b, text, pair, compare_text, max_length, token, n_used, stages)
        with stages.stage("charts"):
            blocks = _blocks(results, scheme, scale)
        if generate is not None:
            with stages.stage("generation"):
                from attnjax.report_generation import generation_sections

                try:
                    blocks += generation_sections(model, text, generate, system)
                except ValueError as error:
                    raise ReportInputError(str(error)) from None
    finally:
        stages.close()
    summary = {
        "model": model.name or model.family, "family": model.family, "layers": model.config.num_layers,
        "heads": model.config.num_heads, "tokens": len(results.tokens), "maps": results.mode,
        "anomalies": len(results.anomalies),
    }
    return Report(title=f"attnjax report: {model.name or model.family}", blocks=blocks,
                  timings=dict(stages.timings), summary=summary)


def _capture(model, n_tokens: int) -> Tuple[Capture, str]:
    """What to record: full maps (+ pooled stats when the overview needs them)."""
    full_limit = full_map_tokens(model.config.num_layers, model.config.num_heads)
    if n_tokens <= full_limit:
        return Capture(attention=True), "full"
    if n_tokens <= FULL_ATTENTION_TOKENS:
        return Capture(attention=True, stats=True, pool=POOL_BINS), "pooled overview"
    return Capture(stats=True, pool=POOL_BINS), "statistics only"


def _analyse(model, model_b, text, pair, compare_text, max_length, token, n_tokens, stages: Stages) -> Results:
    capture, mode = _capture(model, n_tokens)
    # q, k, v (O(T) per layer): the inside-a-head views read them, and without maps head_scores
    # recomputes next_token, duplicate and induction from them (analysis._qk_terms).
    capture = dataclasses.replace(capture, qkv=True)
    decoder = is_decoder(model.family)
    with stages.stage("run model"):
        # A decoder's next-token chart needs the last position's logits only: never (T, V).
        output, trace = attnjax.run(model, text if pair is None else [(text, pair)], capture=capture,
                                    max_length=max_length, return_output=True, logits="last" if decoder else "none")
        jax.block_until_ready(trace.mask)
    segments = None
    if pair is not None:  # segment ids: the same tokenisation as the run, without the padding
        batch = attnjax.tokenize(model, [(text, pair)], max_length=max_length)
        segments = batch.token_type_ids[0][batch.attention_mask[0]]
    positions, tokens = sequence_tokens(trace, 0)
    special = SPECIAL_TOKENS | set(getattr(model.tokenizer, "all_special_tokens", ()) or ())
    position = choose_token(tokens, positions, token, special)
    with stages.stage("head scores"):
        heads = analysis.classify_heads(analysis.head_scores(trace))
    with stages.stage("similarity and focus"):
        similarity = analysis.layer_similarity(trace)
        focus = analysis.focus_by_layer(trace)
    flow = rollout = None
    with stages.stage("token flow"):
        if trace.attention is not None:
            flow = analysis.token_flow(trace, position)
            rolled = analysis.rollout_frame(trace, sequence=0)
            rollout = rolled[rolled["query"] == position]
    with stages.stage("anomalies"):
        anomalies = analysis.detect_anomalies(trace, similarity=similarity)
        too_short = dict(anomalies.attrs.get("too_short", {}))
        if "flagged" in anomalies.columns:
            anomalies = anomalies[anomalies["flagged"].astype(bool)]
    results = Results(model=model, model_b=model_b, text=text, pair=pair, compare_text=compare_text,
                      max_length=max_length, segments=segments,
                      trace=trace, mode=mode, positions=positions, tokens=tokens, position=position, heads=heads,
                      similarity=similarity, focus=focus, flow=flow, rollout=rollout, anomalies=anomalies,
                      too_short=too_short)
    if compare_text is not None or model_b is not None:
        with stages.stage("comparison"):
            results.changes, results.compare_labels, results.other = _comparison(results, capture)
            results.other_heads = analysis.classify_heads(analysis.head_scores(results.other))
    with stages.stage("next token"):
        if decoder:
            logits = np.asarray(output.logits[0], np.float32)                     # (V,) at the last token
            results.next_token = next_token_frames(logits, lambda i: model.tokenizer.decode([i]), k=TOP_K_NEXT)
    return results


def _comparison(results: Results, capture: Capture) -> Tuple[pd.DataFrame, Tuple[str, str], Trace]:
    model, model_b = results.model, results.model_b
    other_model = model_b if model_b is not None else model
    other_text = results.compare_text if results.compare_text is not None else results.text
    other_pair = results.pair if results.compare_text is None else None
    n_other = count_tokens(other_model, other_text, other_pair)
    if results.max_length is None and n_other > other_model.config.max_positions:
        raise ReportInputError(f"The comparison text is {n_other} tokens, more than the model's "
                               f"{other_model.config.max_positions} positions; pass --max-length to truncate it.")
    inputs = other_text if other_pair is None else [(other_text, other_pair)]
    other = attnjax.run(other_model, inputs, capture=capture, max_length=results.max_length)
    changes = analysis.compare(results.trace, other)
    if model_b is not None and results.compare_text is not None:
        labels = (f"{model.name} on the text", f"{model_b.name} on the comparison text")
    elif model_b is not None:
        labels = (model.name or "model A", model_b.name or "model B")
    else:
        labels = ("text", "comparison text")
    return changes, labels, other


def _maps_text(mode: str) -> str:
    return {
        "full": "full T x T maps",
        "pooled overview": f"full maps; overview pooled to {POOL_BINS} x {POOL_BINS}",
        "statistics only": f"streaming statistics only (pooled {POOL_BINS} x {POOL_BINS})",
    }[mode]


def _run_table(r: Results, scheme: str, scale: str) -> List[Tuple[str, Any]]:
    config = r.model.config
    rows = [("model", r.model.name or r.model.family)]
    if r.model_b is not None:
        rows.append(("model B", r.model_b.name or r.model_b.family))
    rows += [
        ("family", r.model.family),
        ("layers x heads", f"{config.num_layers} x {config.num_heads}"),
        ("hidden size", getattr(config, "hidden_size", "")),
        ("max positions", config.max_positions),
    ]
    rows += _decoder_rows(config)
    rows += [
        ("tokens", f"{len(r.tokens)}" + (f" (truncated to --max-length {r.max_length})" if r.max_length else "")),
        ("text", truncate(" ".join(r.text.split()), 160)),
    ]
    if r.pair is not None:
        rows += _pair_rows(r)
    if r.compare_text is not None:
        rows.append(("comparison text", truncate(" ".join(r.compare_text.split()), 160)))
    rows += [
        ("attention maps", _maps_text(r.mode)),
        ("colours", f"{scheme}, {scale} scale"),
        ("attnjax / jax", f"{attnjax.__version__} / {jax.__version__} on {jax.default_backend()}"),
        ("made", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
    ]
    return rows


def _pair_rows(r: Results) -> List[Tuple[str, Any]]:
    """A sentence pair: its second sentence, each segment's positions and the [SEP] positions."""
    segments = np.asarray(r.segments)
    spans = []
    for segment, name in ((0, "A (segment 0)"), (1, "B (segment 1)")):
        where = np.asarray(r.positions)[segments == segment]
        if where.size:
            spans.append(f"{name}: positions {int(where[0])}-{int(where[-1])}")
    separators = [int(p) for p, t in zip(r.positions, r.tokens) if t == "[SEP]"]
    shown = f"; [SEP] at {', '.join(map(str, separators))}" if separators else ""
    return [("pair: second sentence", truncate(" ".join(r.pair.split()), 160)),
            ("segments", ", ".join(spans) + shown)]


def _decoder_rows(config) -> List[Tuple[str, Any]]:
    """What a Llama-like decoder's attention is made of: kv heads, windows, soft-cap, dtype."""
    rows: List[Tuple[str, Any]] = []
    kv_heads = getattr(config, "num_kv_heads", None)
    if kv_heads is not None and kv_heads != config.num_heads:
        kind = "multi-query" if kv_heads == 1 else "grouped-query"
        rows.append(("kv heads", f"{kv_heads} ({kind}: {config.num_heads // kv_heads} query heads share each)"))
    windows = getattr(config, "windows", ())
    sliding = [i for i, window in enumerate(windows) if window is not None]
    if sliding:
        sizes = sorted({windows[i] for i in sliding})
        rows.append(("sliding windows", f"layers {', '.join(map(str, sliding))} see the last "
                                         f"{' / '.join(map(str, sizes))} tokens"))
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        rows.append(("score soft-cap", f"c tanh(s / c) with c = {softcap}"))
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        rows.append(("dtype", str(dtype)))
    return rows


def _blocks(r: Results, scheme: str, scale: str) -> List[Block]:
    """The page: headings, notes, tables and charts, in reading order."""
    frame = attention_frame(r.trace, max_tokens=None if r.mode == "full" else 0)  # 0: use the pooled maps
    blocks: List[Block] = [
        Block("h1", f"Attention report: {r.model.name or r.model.family}"),
        Block("h2", "What was run", anchor="run"),
        Block("table", _run_table(r, scheme, scale)),
        Block("note", "Tokens (position:token; \u2423 marks a space):"),
        Block("tokens", "  ".join(f"{int(p)}:{t.replace(' ', VISIBLE_SPACE)}" for p, t in zip(r.positions, r.tokens))),
        Block("h2", "Model overview", anchor="overview"),
    ]
    if r.mode != "full":
        blocks.append(Block("note", f"{len(r.tokens)} tokens is over the overview's full-map budget for this model "
                                    f"size, so it shows {POOL_BINS} x {POOL_BINS} pooled maps (block means from "
                                    "the streaming statistics)."))
    blocks += [
        Block("note", "Each thumbnail is one head (rows: queries, columns: keys), coloured "
                      + ("on a fixed 0-1 scale" if scale == "absolute" else "relative to its own maximum")
                      + "; \u2248 marks a near-uniform head. Click one, or use the sliders, to open it large; "
                      "hover for tokens and weights."),
        Block("chart", model_overview(frame, scores=r.heads, scheme=scheme, scale=scale,
                                      start=overview_start(r.heads))),
        Block("h2", "Head taxonomy", anchor="taxonomy"),
        Block("note", "Each head gets one category from its scores (Clark et al. 2019 thresholds, counted as a "
                      "share of the mass above what uniform attention over this text's tokens would give; "
                      "induction and duplicate from Olsson et al. 2022). Hover for every score."),
        Block("chart", taxonomy_chart(r.heads)),
        Block("h2", "Layer similarity and focus", anchor="layers"),
        Block("chart", layer_similarity_chart(r.similarity, scheme=scheme)),
        Block("chart", focus_chart(r.focus)),
        Block("h2", "Token flow", anchor="flow"),
    ]
    if r.flow is not None:
        token = r.tokens[list(r.positions).index(r.position)]
        blocks += [
            Block("note", f"Where token {r.position} (\u201c{token}\u201d) looks in each layer, averaged over heads "
                          "(raw, with a head chooser), and its attention rollout (Abnar & Zuidema 2020). Pick "
                          "another token with --token."),
            Block("chart", token_flow_chart(r.flow, r.rollout, position=r.position, scheme=scheme, heads=True)),
        ]
    else:
        blocks.append(Block("note", f"Left out: the input is over {FULL_ATTENTION_TOKENS} tokens, so no full "
                                    "attention maps were kept, and token flow needs them."))
    blocks += [Block("h2", "Anomalies", anchor="anomalies"), Block("chart", anomaly_chart(r.anomalies, r.heads))]
    if len(r.anomalies):
        columns = [c for c in ("layer", "head", "kind", "score", "threshold", "detail") if c in r.anomalies.columns]
        table = r.anomalies[columns].copy()
        table["head"] = ["all" if int(h) == ALL_HEADS else int(h) for h in table["head"]]
        blocks.append(Block("table", table))
    else:
        blocks.append(Block("note", "No head or layer crossed an anomaly threshold."))
    blocks += _too_short_notes(r)
    if r.changes is not None:
        blocks += _comparison_blocks(r, scheme, scale)
    if r.next_token is not None:
        blocks += [
            Block("h2", "Next token", anchor="next-token"),
            Block("note", "The model's top next tokens after the text. The temperature slider recomputes the "
                          "softmax in the page, with the normaliser over the whole vocabulary."),
            Block("chart", next_token_explorer(*r.next_token, context=" ".join(r.text.split())[-60:])),
        ]
    blocks += inside_blocks(r)
    return blocks


def _too_short_notes(r: Results) -> List[Block]:
    """Say which anomaly kinds gave no verdict because the text is too short, and why."""
    if not r.too_short:
        return []
    kinds = ", ".join(sorted(r.too_short))
    reason = next(iter(r.too_short.values()))
    return [Block("note", f"Not judged on this text: {kinds}. The text is too short for a verdict ({reason}; "
                          "the minimum for each kind is in attnjax.analysis.anomalies). A short text is not "
                          "evidence of a healthy or a broken head: give a longer one to judge them.")]


def _comparison_blocks(r: Results, scheme: str, scale: str) -> List[Block]:
    """The comparison: what is compared (by position or by scores only), the per-head
    change, then text B's tokens and maps (text A's are the overview above)."""
    a, b = r.compare_labels
    aligned = r.changes.attrs.get("alignment") == "positions"
    colour = ("Jensen-Shannon divergence between the two attention maps of each head"
              if aligned else "the change in each head's mean entropy (B - A)")
    blocks = [
        Block("h2", "Comparison", anchor="comparison"),
        Block("note", f"A = {a}, B = {b}. {r.changes.attrs.get('alignment_note', '')} Colour: {colour}; "
                      "text: heads whose category changed."),
        Block("chart", comparison_chart(r.changes, labels=r.compare_labels)),
    ]
    positions, tokens = sequence_tokens(r.other, 0)
    blocks += [
        Block("note", f"B's tokens (position:token), {len(tokens)} of them; A's maps are the model overview above:"),
        Block("tokens", "  ".join(f"{int(p)}:{t.replace(' ', VISIBLE_SPACE)}" for p, t in zip(positions, tokens))),
    ]
    config = (r.model_b or r.model).config
    fits = r.mode == "full" and len(tokens) <= full_map_tokens(config.num_layers, config.num_heads)
    if r.other.attention is not None and fits:
        blocks += [Block("note", f"B's maps ({b}), drawn like the overview above."),
                   Block("chart", model_overview(attention_frame(r.other), scores=r.other_heads,
                                                 scheme=scheme, scale=scale))]
    else:
        blocks.append(Block("note", f"B's maps are left out: with {len(tokens)} tokens (and A's "
                                    f"{len(r.tokens)}) the maps are over the overview's full-map budget."))
    return blocks
