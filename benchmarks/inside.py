"""The inside-a-head views: build time and spec size at a few lengths (bundled MiniLM).

For each length, one run with Capture(attention=True, qkv=True), then for each view
the time to build the Altair chart plus its spec (what the report pays) and the
spec's size as the exporter writes it (script_json):

- head_view(trace, layer=4, head=7)     (one layer; top 5 keys per query above 32 tokens)
- attention_steps(trace, 4, 7, query)  (the middle token; 48 heaviest keys drawn)
- qk_embedding(trace, 4, 7)             (one head)
- model_structure(model)                (no run; independent of the length)

    python benchmarks/inside.py [--lengths 16,128,400]

Wall clock on whatever shares the machine; median of --repeats builds.
"""

from __future__ import annotations

import argparse
import statistics
import time

WORDS = ("the quick brown fox jumps over a lazy dog while students read their books in a quiet library "
         "and the rain falls softly on old roofs").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16,128,400")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import attnjax
    from attnjax import Capture, viz
    from attnjax.viz.html import chart_spec, script_json

    model = attnjax.load("minilm")
    views = {
        "head_view": lambda t, q: viz.head_view(t, 4, 7),
        "attention_steps": lambda t, q: viz.attention_steps(t, 4, 7, q),
        "qk_embedding": lambda t, q: viz.qk_embedding(t, 4, 7),
        "model_structure": lambda t, q: viz.model_structure(model),
    }
    print("| tokens | view | build + spec (s) | spec (kB) |")
    print("|---:|---|---:|---:|")
    for length in (int(n) for n in args.lengths.split(",")):
        text = " ".join(WORDS[i % len(WORDS)] for i in range(length))
        trace = attnjax.run(model, text, capture=Capture(attention=True, qkv=True), max_length=length)
        tokens = int(trace.mask[0].sum())
        for name, build in views.items():
            times, size = [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                spec = chart_spec(build(trace, tokens // 2))
                times.append(time.perf_counter() - start)
                size = len(script_json(spec))
            print(f"| {tokens} | {name} | {statistics.median(times):.2f} | {size / 1000:.0f} |")


if __name__ == "__main__":
    main()
