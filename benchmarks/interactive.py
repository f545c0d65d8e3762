"""Interactive latency: a new text in a warm process, and start-up in fresh ones.

For the bundled MiniLM, in one warm process (one warm-up text first), the median over
~10 new texts of different lengths (up to 128 tokens) of:

- forward:         attnjax.run(model, text) (tokenise, pad, jitted forward, Trace);
- head_scores:     attnjax.analysis.head_scores(trace);
- classify_heads:  attnjax.analysis.classify_heads(scores);
- total:           the three together.

Then the explorer (attnjax.explore), in the same kind of warm process (every length
bucket compiled once by other texts first), median over the same new texts of the
action -> updated view time, the charts built as far as their Vega-Lite specs (what a
notebook's display sends; the browser's drawing is not timed):

- new text -> heatmap:   Explorer.set_text until the heatmap is on show (the widget
                         redraws it before the overview is built);
- new text -> overview:  set_text to its end (the model overview redrawn too);
- new head:              Explorer.set_head (heatmap only).

Then ``import attnjax`` and ``attnjax.load("minilm")`` (after the import), each timed
in fresh subprocesses (median of a few), and the whole ``attnjax report --text "The cat
sat on the mat."`` command, wall clock: once cold (``ATTNJAX_CACHE`` a new empty
directory, so neither compiled programs nor the Vega bundle are cached) and then warm
(the same directory; median of a few).

    python benchmarks/interactive.py [--pad-to bucket|exact] [--startup-repeats 3] [--report-repeats 3]

Targets (issue 10): total <= 200 ms median, forward <= 50 ms; action -> updated view
<= 200 ms; import <= 1 s, load <= 1.5 s; report <= 6 s warm, <= 15 s cold. Timings are
wall clock on whatever shares the machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Words to draw texts from: ordinary prose, so lengths vary with the word count.
WORDS = ("the quick brown fox jumps over a lazy dog while students read their books in "
         "a quiet library , and the rain falls softly on old roofs . researchers study how "
         "attention heads in language models route information between tokens").split()


def new_texts(count: int = 10, seed: int = 1):
    """count texts of different lengths (about 4 to 110 words: <= 128 tokens)."""
    import random

    rng = random.Random(seed)
    lengths = [4 + (i * 106) // max(count - 1, 1) for i in range(count)]
    rng.shuffle(lengths)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) + f" {i}." for i, n in enumerate(lengths)]


def warm_medians(pad_to, count: int):
    import attnjax
    from attnjax.analysis import classify_heads, head_scores

    model = attnjax.load("minilm")
    kwargs = {} if pad_to is None else {"pad_to": pad_to}
    warm = attnjax.run(model, "A warm-up sentence.", **kwargs)
    classify_heads(head_scores(warm))
    times = {"forward": [], "head_scores": [], "classify_heads": [], "total": []}
    lengths = []
    for text in new_texts(count):
        t0 = time.perf_counter()
        trace = attnjax.run(model, text, **kwargs)
        trace.attention.block_until_ready()
        t1 = time.perf_counter()
        scores = head_scores(trace)
        t2 = time.perf_counter()
        classify_heads(scores)
        t3 = time.perf_counter()
        times["forward"].append(t1 - t0)
        times["head_scores"].append(t2 - t1)
        times["classify_heads"].append(t3 - t2)
        times["total"].append(t3 - t0)
        lengths.append(int(trace.mask.sum()))
    return {name: statistics.median(values) for name, values in times.items()}, times, lengths


def explorer_medians(count: int):
    """Median ms of new text -> heatmap, new text -> overview, and new head, in the explorer."""
    import attnjax

    model = attnjax.load("minilm")
    explorer = attnjax.explore(model, "A warm-up sentence.")
    explorer.warming.join()  # its background compilation of every bucket, not timed
    for text in new_texts(count, seed=2):  # other texts of the same lengths: every bucket compiled
        explorer.set_text(text)
    shown = []
    explorer.on_change(lambda _: shown.append(time.perf_counter()))
    times = {"new text -> heatmap": [], "new text -> overview": [], "new head": []}
    for i, text in enumerate(new_texts(count)):
        shown.clear()
        start = time.perf_counter()
        assert explorer.set_text(text), explorer.message
        end = time.perf_counter()
        times["new text -> heatmap"].append(shown[0] - start)
        times["new text -> overview"].append(end - start)
        start = time.perf_counter()
        explorer.set_head((i * 5 + 1) % explorer.num_heads)
        times["new head"].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, times


def fresh_seconds(code: str, repeats: int) -> float:
    """Median wall seconds of the timed part of `code` (it prints its own seconds)."""
    values = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        values.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(values)


IMPORT_CODE = "import time; t = time.perf_counter(); import attnjax; print(time.perf_counter() - t)"
LOAD_CODE = ("import time, attnjax; t = time.perf_counter(); attnjax.load('minilm'); "
             "print(time.perf_counter() - t)")


REPORT_TEXT = "The cat sat on the mat."


def report_seconds(cache: Path, out: Path) -> float:
    """Wall seconds of one `attnjax report` command (interpreter start included)."""
    command = [str(Path(sys.executable).with_name("attnjax")), "report", "--text", REPORT_TEXT, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True,
                   env={**os.environ, "ATTNJAX_CACHE": str(cache / "jax")})
    return time.perf_counter() - start


def load_average() -> str:
    return "load average " + " ".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad-to", default="bucket", help="'bucket' (run's default), 'exact', or an int")
    parser.add_argument("--texts", type=int, default=10)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--report-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    pad_to = None if args.pad_to == "bucket" else (args.pad_to if args.pad_to == "exact" else int(args.pad_to))
    print(f"({load_average()})")
    medians, times, lengths = warm_medians(pad_to, args.texts)
    print(f"MiniLM, warm process, {args.texts} new texts of {min(lengths)}-{max(lengths)} tokens "
          f"(pad_to={args.pad_to}); median ms:")
    for name, value in medians.items():
        print(f"  {name:<15} {value * 1e3:8.1f}   (max {max(times[name]) * 1e3:.1f})")
    medians, times = explorer_medians(args.texts)
    print(f"attnjax.explore (MiniLM), warm process, the same {args.texts} new texts; median ms:")
    for name, value in medians.items():
        print(f"  {name:<22} {value * 1e3:8.1f}   (max {max(times[name]) * 1e3:.1f})")
    print(f"fresh subprocesses, median of {args.startup_repeats}:")
    print(f"  import attnjax          {fresh_seconds(IMPORT_CODE, args.startup_repeats):6.2f} s")
    print(f"  attnjax.load('minilm')  {fresh_seconds(LOAD_CODE, args.startup_repeats):6.2f} s")
    with tempfile.TemporaryDirectory() as folder:
        cache, out = Path(folder), Path(folder) / "report.html"
        cold = report_seconds(cache, out)
        warm = [report_seconds(cache, out) for _ in range(args.report_repeats)]
    print(f"attnjax report --text {REPORT_TEXT!r}, whole command, wall:")
    print(f"  cold (empty cache)      {cold:6.2f} s")
    print(f"  warm (median of {len(warm)})     {statistics.median(warm):6.2f} s   "
          f"({', '.join(f'{value:.2f}' for value in warm)})")
    print(f"({load_average()})")


if __name__ == "__main__":
    main()
