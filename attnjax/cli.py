"""The command line: `attnjax report` (a model and a text -> one HTML page) and `attnjax profile`.

    attnjax report                                   # bundled MiniLM on the built-in example
    attnjax report --text "The cat sat on the mat." --out cat.html
    attnjax report --model gpt2 --file story.txt --max-length 256
    attnjax report --text "She went home." --compare "He went home."
    attnjax report --text "Where is it?" --pair "Two streets north."   # a BERT sentence pair
    attnjax profile corpus.txt --out heads.csv       # per-head scores over a corpus (attnjax/profile_cli.py)
    attnjax lab induction --out induction-model      # train a small GPT, watch heads form

Bad input (missing file, empty text, unknown model, unwritable output, over-long
text without --max-length) is reported in one line on stderr with exit status 2;
an unexpected failure in one line with status 1 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

EXAMPLE_TEXT = Path(__file__).resolve().parent / "data" / "example.txt"
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a Unix tool killed by a closed pipe returns
DTYPES = ("float32", "bfloat16")  # --dtype: what attnjax.load(dtype=...) takes from the command line


class InputError(Exception):
    """Input the command cannot use; the message says what to do."""


def build_parser() -> argparse.ArgumentParser:
    from attnjax import __version__

    parser = argparse.ArgumentParser(prog="attnjax", description="Look inside Transformer attention.")
    parser.add_argument("--version", action="version", version=f"attnjax {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = commands.add_parser("report", help="run a model on a text and write an HTML report",
                                 description="Run a model on a text and write one self-contained HTML report.")
    report.add_argument("--model", default="minilm",
                        help="'minilm' (bundled, offline), a local Hugging Face directory, or a hub id")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to analyse (default: the built-in example)")
    source.add_argument("--file", type=Path, help="read the text from this file (UTF-8)")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="where to write (default report.html)")
    report.add_argument("--max-length", type=int, help="truncate the text to this many tokens")
    report.add_argument("--pair", metavar="TEXT2",
                        help="BERT sentence pair: run [CLS] TEXT [SEP] TEXT2 [SEP] with segment ids 0 / 1")
    report.add_argument("--compare", metavar="TEXT2", help="also compare with this second text")
    report.add_argument("--generate", type=int, metavar="N", help="decoders: also continue the text for N tokens "
                        "and show what each new token read, and how much went to each prompt span")
    report.add_argument("--system", metavar="TEXT", help="with --generate: a system prompt before the text")
    report.add_argument("--model-b", help="also compare with this second model (same architecture)")
    report.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="parameter dtype of a Llama-like decoder (default float32, exact parity; "
                             "bfloat16 halves the weights' memory; statistics stay float32)")
    report.add_argument("--token", help="token for the token-flow chart: a position (negative counts from "
                                        "the end: -1 is the last token) or the token's text")
    report.add_argument("--scheme", default="viridis", choices=("viridis", "plasma", "magma", "inferno", "cividis"),
                        help="colour scheme of the attention maps")
    report.add_argument("--scale", default="linear", choices=("linear", "log", "quantile", "absolute"),
                        help="colour scale of the attention maps (absolute: fixed 0-1)")
    report.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on for inputs over 256 tokens)")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from attnjax.profile_cli import add_parser as add_profile_parser

    add_profile_parser(commands, DTYPES)

    from attnjax.lab import commands as lab_commands  # `attnjax lab`: attnjax/lab/commands.py

    lab_commands.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `attnjax` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has already printed
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        if args.command == "report":
            return run_report(args)
        if args.command == "lab":
            from attnjax.lab import commands as lab_commands

            return lab_commands.run(args)
        from attnjax.profile_cli import run_profile

        return run_profile(args)
    except InputError as error:
        return fail(str(error), EXIT_BAD_INPUT, args)
    except BrokenPipeError:  # the reader went away (`attnjax ... | head`): stop quietly
        quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return fail("interrupted", 130, args)
    except Exception as error:  # one line, not a traceback, unless --debug
        if isinstance(error, (ValueError, FileNotFoundError)):
            return fail(str(error), EXIT_BAD_INPUT, args)
        return fail(f"{type(error).__name__}: {error} (run with --debug for the traceback)", EXIT_FAILURE, args)


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


def fail(message: str, status: int, args) -> int:
    if getattr(args, "debug", False) and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    first_line = " ".join(str(message).split()) or "unknown error"
    print(f"attnjax: error: {first_line}", file=sys.stderr)
    return status


def read_text(args) -> str:
    if args.file is not None:
        path = args.file
        if not path.exists():
            raise InputError(f"--file {path}: no such file.")
        if path.is_dir():
            raise InputError(f"--file {path} is a directory; give a text file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--file {path} is not UTF-8 text.") from None
        if not text.strip():
            raise InputError(f"--file {path} is empty; give a file with some words.")
        return text
    if args.text is not None:
        if not args.text.strip():
            raise InputError("--text is empty; give some words.")
        return args.text
    return EXAMPLE_TEXT.read_text(encoding="utf-8")


def check_output(path: Path, flag: str = "--out", example: str = "report.html") -> None:
    """Fail now, not after the model ran, if ``path`` cannot be written."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name such as {path / example}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: directory {parent} does not exist; create it first.")
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise InputError(f"{flag} {path} cannot be written ({error.strerror or error}).") from None
    if not existed:
        path.unlink(missing_ok=True)


def check_max_length(value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise InputError(f"--max-length {value} must be a positive number of tokens.")


def quiet_libraries() -> None:
    """The command reports over-long input itself: silence transformers' own warnings
    (and its advice that PyTorch is missing: attnjax never needs it) for the tokenizers
    that still go through it. Set in the environment, so transformers is not imported
    (it pulls in torch where installed) unless a tokenizer needs it."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def load_model(name: str, flag: str = "--model", dtype: str = "float32"):
    import attnjax
    from attnjax.models.checkpoints import TOKENIZER_FILES

    quiet_libraries()
    try:
        model = attnjax.load(name, dtype=None if dtype == "float32" else dtype)
    except ValueError as error:  # CheckpointError, UnsupportedConfigError
        raise InputError(f"{flag} {name}: {error}") from None
    if model.tokenizer is None:
        raise InputError(
            f"{flag} {name} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}), so the command "
            "cannot turn text into tokens. Copy the checkpoint's tokenizer files into the directory, or "
            "pass token ids from Python: model.forward(model.params, input_ids).")
    return model


def check_comparable(model, model_b, args) -> None:
    """--model-b is compared head by head: refuse another shape now, not after the runs."""
    def shape(m):
        return m.config.num_layers, m.config.num_heads

    if shape(model) != shape(model_b):
        raise InputError(
            f"--model-b {args.model_b} has {shape(model_b)[0]} layers x {shape(model_b)[1]} heads, but "
            f"--model {args.model} has {shape(model)[0]} x {shape(model)[1]}; the comparison matches "
            "heads one to one, so give a model of the same architecture (e.g. another checkpoint of it).")


def run_report(args) -> int:
    text = read_text(args)
    check_output(args.out)
    check_max_length(args.max_length)
    if args.compare is not None and not args.compare.strip():
        raise InputError("--compare is empty; give the second text.")
    if args.pair is not None and not args.pair.strip():
        raise InputError("--pair is empty; give the second sentence of the pair.")
    if args.pair is not None and args.compare is not None:
        raise InputError("--pair and --compare cannot be combined: --compare takes one text; compare the pair "
                         "with another checkpoint through --model-b, or drop --pair.")
    if args.generate is not None and args.generate < 1:
        raise InputError(f"--generate {args.generate}: give a positive number of tokens.")
    if args.system is not None and args.generate is None:
        raise InputError("--system is a system prompt for --generate; add --generate N.")
    token = None if args.token is None else (int(args.token) if args.token.strip().lstrip("-").isdigit()
                                              else args.token)

    import attnjax
    from attnjax.report import ReportInputError, build_report, count_tokens

    attnjax.enable_compilation_cache()
    attnjax.tune_host_allocator()
    started = time.perf_counter()
    timings = {}
    stamp = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    timings["load model"] = time.perf_counter() - stamp
    model_b = None
    if args.model_b:
        stamp = time.perf_counter()
        model_b = load_model(args.model_b, "--model-b", dtype=args.dtype)
        timings["load model B"] = time.perf_counter() - stamp
        check_comparable(model, model_b, args)
    if args.pair is not None:
        from attnjax.models.common import is_decoder

        if is_decoder(model.family):
            raise InputError(f"--pair makes a BERT sentence pair ([CLS] A [SEP] B [SEP], segment ids 0 / 1); "
                             f"--model {args.model} is a {model.family} decoder, which reads one text: put both "
                             "sentences in --text instead.")
    if args.max_length is None:
        for label, which, words in (("text", model, text), ("--compare text", model_b or model, args.compare)):
            if words is None:
                continue
            count = count_tokens(which, words, args.pair if label == "text" else None)
            if count > which.config.max_positions:
                raise InputError(f"the {label} is {count} tokens, more than {which.name}'s "
                                 f"{which.config.max_positions} positions; pass --max-length "
                                 f"{which.config.max_positions} (or less) to truncate it.")
    elif args.max_length > model.config.max_positions:
        raise InputError(f"--max-length {args.max_length} is more than {model.name}'s "
                         f"{model.config.max_positions} positions.")
    try:
        report = build_report(model, text, pair=args.pair, compare_text=args.compare, model_b=model_b,
                              max_length=args.max_length, token=token, scheme=args.scheme, scale=args.scale,
                              progress=args.progress, generate=args.generate, system=args.system)
    except ReportInputError as error:
        raise InputError(str(error)) from None
    timings.update(report.timings)
    stamp = time.perf_counter()
    try:
        path = report.save(args.out)
    except OSError as error:
        raise InputError(f"--out {args.out} cannot be written ({error.strerror or error}).") from None
    timings["write HTML"] = time.perf_counter() - stamp
    size = path.stat().st_size
    print(f"Report of {report.summary['model']} on {report.summary['tokens']} tokens "
          f"({report.summary['anomalies']} anomalies flagged)")
    for name, seconds in timings.items():
        print(f"  {name:<22} {seconds:7.2f} s")
    print(f"  {'total':<22} {time.perf_counter() - started:7.2f} s")
    print(f"Wrote {path.resolve()} ({size / 1e6:.1f} MB)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
