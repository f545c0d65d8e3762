"""`attnjax profile CORPUS`: per-head scores over a corpus file, streamed (attnjax.profile).

    attnjax profile corpus.txt                           # paragraphs separated by blank lines
    attnjax profile data.jsonl --column text --out heads.parquet --html corpus.html
    attnjax profile data.csv --batch-size 64 --max-length 256 --resume

A checkpoint (``--checkpoint``, by default beside the output) is written as the job
goes and removed when it finishes; after a crash, the same command with ``--resume``
continues where it stopped. The HTML page (``--html``) holds the head stability grid,
the taxonomy, score spreads across texts, focus by layer, anomalies over the corpus
and what was skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from attnjax.readers import FORMATS

UNIT = {"txt": "paragraph", "jsonl": "record", "csv": "row", "parquet": "row"}
SKIPPED_SHOWN = 200  # rows of the skipped table on the page


def add_parser(commands, dtypes) -> None:
    profile = commands.add_parser(
        "profile", help="per-head attention scores over a corpus file (streamed, batched)",
        description="Run a model over a corpus file in length-bucketed batches, recording only streaming "
                    "statistics, and write per-head scores, categories and their stability across texts.")
    profile.add_argument("corpus", type=Path, help="corpus file: txt (paragraphs separated by blank lines), "
                                                   "jsonl, csv or parquet")
    profile.add_argument("--model", default="minilm", help="as for report")
    profile.add_argument("--format", choices=FORMATS, help="corpus format (default: from the file suffix, else txt)")
    profile.add_argument("--column", default="text", help="the text field of jsonl / csv / parquet (default text)")
    profile.add_argument("--max-length", type=int, help="truncate each text to this many tokens "
                                                        "(default: the model's positions)")
    profile.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    profile.add_argument("--dtype", choices=dtypes, default="float32", help="as for report")
    profile.add_argument("--out", type=Path, help="write the per-head frame to heads.csv or heads.parquet")
    profile.add_argument("--csv", type=Path, help="write the per-head frame to this CSV (as --out x.csv)")
    profile.add_argument("--html", type=Path, help="write a self-contained corpus page")
    profile.add_argument("--checkpoint", type=Path, help="where partial sums are saved (default: beside the "
                                                         "first output or the corpus, NAME.checkpoint.npz)")
    profile.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    profile.add_argument("--induction", action=argparse.BooleanOptionalAction, default=True,
                         help="also the next_token, duplicate and induction scores, recomputed tile by tile from "
                              "the recorded queries and keys (O(T) memory at any length; --no-induction is about "
                              "20%% faster and leaves them NaN)")
    profile.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                         help="progress bar with texts/s, tokens/s and (when the size is known) an ETA")
    profile.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_profile(args) -> int:
    from attnjax.cli import EXIT_OK, InputError, check_max_length, check_output, load_model
    from attnjax.readers import CorpusError, check_corpus, corpus_format, read_corpus, write_table

    try:
        format = corpus_format(args.corpus, args.format)
        total = check_corpus(args.corpus, format, args.column)
    except CorpusError as error:
        raise InputError(str(error)) from None
    check_max_length(args.max_length)
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be a positive number of texts.")
    outputs = [(flag, path, example) for flag, path, example in (
        ("--out", args.out, "heads.csv"), ("--csv", args.csv, "heads.csv"), ("--html", args.html, "corpus.html"))
        if path is not None]
    for flag, path, example in outputs:
        check_output(path, flag, example)
    if args.out is not None and args.out.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError("--out .parquet needs pyarrow, which attnjax does not install: pip install pyarrow") \
                from None
    checkpoint = args.checkpoint or _default_checkpoint(args, outputs)
    check_output(checkpoint, "--checkpoint", "profile.checkpoint.npz")
    if checkpoint.exists() and not args.resume:
        checkpoint.unlink()  # a fresh run; --resume keeps it

    import pandas as pd

    import attnjax

    attnjax.enable_compilation_cache()
    attnjax.tune_host_allocator()
    started = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    if args.max_length is not None and args.max_length > model.config.max_positions:
        raise InputError(f"--max-length {args.max_length} is more than {model.name}'s "
                         f"{model.config.max_positions} positions.")
    unit = UNIT[format]
    try:
        frame = attnjax.profile(model, read_corpus(args.corpus, format, args.column), batch_size=args.batch_size,
                                max_length=args.max_length, progress=args.progress, checkpoint=checkpoint,
                                total=total, capture=attnjax.Capture(stats=True, qkv=args.induction))
    except ValueError as error:
        if "No usable text" in str(error):
            raise InputError(f"{args.corpus}: none of its {unit}s could be used ({error}).") from None
        raise
    skipped = attnjax.skipped_texts(frame)
    for index, reason in zip(skipped["index"], skipped["reason"]):
        print(f"attnjax: skipped {unit} {index + 1} of {args.corpus}: {reason}", file=sys.stderr)
    n_texts, truncated = int(frame["n_texts"].iloc[0]), frame.attrs["n_truncated"]
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        numbers = ", ".join(str(i + 1) for i in skipped["index"][:20]) + (", ..." if len(skipped) > 20 else "")
        print(f"{model.name}: {n_texts} {unit}{'' if n_texts == 1 else 's'}, {int(frame['n_tokens'].iloc[0])} tokens"
              + (f" ({truncated} truncated to {args.max_length or model.config.max_positions} tokens)"
                 if truncated else "")
              + (f"; skipped {len(skipped)} unusable: {unit} {numbers}" if len(skipped) else ""))
        from attnjax.viz.corpus import corpus_focus

        print("\nFocus by layer (means over heads):")
        print(corpus_focus(frame)[["layer", "entropy", "normalized_entropy", "max_weight"]].round(3)
              .to_string(index=False))
        print("\nHead categories:")
        print(frame["category"].value_counts().to_string())
    for flag, path in (("--out", args.out), ("--csv", args.csv)):
        if path is not None:
            try:
                write_table(frame, path)
            except (OSError, CorpusError) as error:
                raise InputError(f"{flag} {path} cannot be written ({getattr(error, 'strerror', None) or error}).") \
                    from None
            print(f"\nWrote {path.resolve()}")
    if args.html is not None:
        save_corpus_page(frame, args.html, model_name=model.name, corpus=str(args.corpus), unit=unit)
        print(f"\nWrote {args.html.resolve()}")
    checkpoint.unlink(missing_ok=True)  # finished: a rerun starts over
    print(f"\nTook {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def _default_checkpoint(args, outputs) -> Path:
    """Beside the first output (heads.csv -> heads.csv.checkpoint.npz), else beside the
    corpus (or in the working directory when the corpus's directory is read-only)."""
    if outputs:
        anchor = outputs[0][1]
        return anchor.with_name(anchor.name + ".checkpoint.npz")
    name = f"{args.corpus.name}.attnjax-profile.checkpoint.npz"
    beside = args.corpus.parent / name
    return beside if os.access(args.corpus.parent, os.W_OK) else Path.cwd() / name


class CorpusPage:
    """What attnjax.viz.html.save_html writes: a title and its blocks."""

    def __init__(self, title: str, blocks):
        self.title, self.blocks = title, blocks


def corpus_page(frame, *, model_name: str, corpus: str, unit: str = "text") -> CorpusPage:
    from attnjax import skipped_texts
    from attnjax.viz.corpus import corpus_anomaly_chart, corpus_focus, spread_chart, stability_chart
    from attnjax.viz.grids import taxonomy_chart
    from attnjax.viz.html import Block
    from attnjax.viz.layers import focus_chart

    skipped = skipped_texts(frame)
    summary = [("model", model_name), ("corpus", corpus), (f"{unit}s profiled", int(frame["n_texts"].iloc[0])),
               ("tokens", int(frame["n_tokens"].iloc[0])), ("truncated", frame.attrs.get("n_truncated", 0)),
               (f"{unit}s skipped", len(skipped)), ("scored from", str(frame["source"].iloc[0]))]
    blocks = [Block("h1", f"Corpus profile: {model_name}"), Block("table", summary)]
    for column, reason in frame.attrs.get("nan_columns", {}).items():
        blocks.append(Block("note", f"{column} is NaN: {reason}."))
    blocks += [
        Block("h2", "Head taxonomy and stability", anchor="taxonomy"),
        Block("chart", taxonomy_chart(frame)),
        Block("chart", stability_chart(frame)),
        Block("h2", "Head scores across texts", anchor="spread"),
        Block("chart", spread_chart(frame)),
        Block("h2", "Focus by layer", anchor="focus"),
        Block("chart", focus_chart(corpus_focus(frame))),
        Block("h2", "Anomalies over the corpus", anchor="anomalies"),
        Block("chart", corpus_anomaly_chart(frame)),
        Block("h2", "What was skipped", anchor="skipped"),
    ]
    if len(skipped):
        shown = skipped.head(SKIPPED_SHOWN).assign(**{unit: skipped["index"].head(SKIPPED_SHOWN) + 1})
        blocks.append(Block("table", shown[[unit, "reason"]]))
        if len(skipped) > SKIPPED_SHOWN:
            blocks.append(Block("note", f"... and {len(skipped) - SKIPPED_SHOWN} more."))
    else:
        blocks.append(Block("note", f"Nothing: every {unit} was used."))
    return CorpusPage(f"Corpus profile: {model_name}", blocks)


def save_corpus_page(frame, path: Path, **details) -> Path:
    from attnjax.viz.html import save_html

    return save_html(corpus_page(frame, **details), path)
