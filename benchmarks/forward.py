"""Forward-pass speed: attnjax.run on the bundled MiniLM vs transformers' eager PyTorch.

8 sentences x 128 tokens. Prints the median of REPEATS timed calls after warm-up
(the paths take turns, so a busy machine slows them alike), for attnjax with full attention capture, attnjax with an empty capture, and
transformers' BertModel (eager attention, output_attentions=True), plus the ratios;
then the first-call (compile) time in a fresh process, cold and with JAX's
persistent compilation cache warm.

    python benchmarks/forward.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 8
LENGTH = 128
REPEATS = 20
SENTENCES = [
    "The committee reviewed the proposal and asked for a revised budget before the next meeting.",
    "Attention heads in small language models often specialise in positional patterns.",
    "She walked along the river at dawn, counting herons and listening to the water.",
    "A compiler turns source code into machine instructions through several passes.",
    "The museum's new wing holds paintings from the seventeenth and eighteenth centuries.",
    "Rain delayed the match, so the players waited in the pavilion drinking tea.",
    "Gradient descent updates each weight in the direction that lowers the loss.",
    "The old lighthouse keeper wrote letters to his daughter every Sunday evening.",
]


def texts():
    return [(s + " ") * 12 for s in SENTENCES[:BATCH]]


def interleaved_medians(paths, repeats=REPEATS):
    """{name: median seconds}, timing one call of each path in turn, REPEATS rounds."""
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, results: dict) -> None:
    base = results["transformers eager, output_attentions"]
    print(f"\n{title}")
    print(f"{'path':<50} {'median ms':>10} {'vs torch':>9}")
    for name, seconds in results.items():
        print(f"{name:<50} {seconds * 1e3:>10.1f} {seconds / base:>8.2f}x")


def first_call(cache_dir: str) -> float:
    """Time from nothing compiled to the first finished attnjax.run, in this process."""
    import jax

    import attnjax

    attnjax.enable_compilation_cache(cache_dir)
    model = attnjax.load("minilm")
    start = time.perf_counter()
    jax.block_until_ready(attnjax.run(model, texts(), max_length=LENGTH).attention)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed rounds per table")
    parser.add_argument("--first-call", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=("default", "tuned"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_call:
        print(f"{first_call(args.first_call):.3f}")
        return
    if args.allocator:
        measure(args.allocator, args.repeats)
        return
    # Each allocator setting in a fresh process: glibc's thresholds are best set
    # before the runtimes start their threads and arenas.
    for allocator in ("default", "tuned"):
        subprocess.run([sys.executable, __file__, "--allocator", allocator,
                        "--repeats", str(args.repeats)], check=True)

    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, __file__, "--first-call", cache]
        cold = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
        warm = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
    print()
    print(f"{'first call, new process, empty compilation cache':<50} {cold * 1e3:>10.1f}")
    print(f"{'first call, new process, persistent cache warm':<50} {warm * 1e3:>10.1f}")


def measure(allocator: str, repeats: int) -> None:
    """One table: the three paths' interleaved medians under one allocator setting."""
    import attnjax

    if allocator == "tuned" and not attnjax.tune_host_allocator():
        print("\nattnjax.tune_host_allocator() does nothing on this platform; no tuned table.")
        return

    import jax
    import torch
    import transformers

    from attnjax import Capture
    from attnjax.models.checkpoints import bundled_path

    torch.set_num_threads(os.cpu_count() or 1)
    model = attnjax.load("minilm")
    batch = attnjax.tokenize(model, texts(), max_length=LENGTH)
    assert batch.input_ids.shape == (BATCH, LENGTH), batch.input_ids.shape

    def ours(capture):
        def call():
            trace = attnjax.run(model, texts(), capture=capture, max_length=LENGTH)
            jax.block_until_ready(trace)
        return call

    full = Capture(attention=True, hidden_states=True)
    empty = Capture()
    for capture in (full, empty):
        ours(capture)()  # warm-up: compile

    reference = transformers.BertModel.from_pretrained(str(bundled_path()), attn_implementation="eager").eval()
    inputs = {k: torch.tensor(v).long() for k, v in
              dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   token_type_ids=batch.token_type_ids).items()}

    def theirs():
        with torch.no_grad():
            reference(**inputs, output_attentions=True, output_hidden_states=True)

    theirs()
    paths = {
        "attnjax.run, capture attention + hidden states": ours(full),
        "attnjax.run, empty capture": ours(empty),
        "transformers eager, output_attentions": theirs,
    }
    if allocator == "default":
        print(f"MiniLM-L6 (6 layers, 12 heads, 384 wide), batch {BATCH} x {LENGTH} tokens, "
              f"{os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}, "
              f"median of {repeats} interleaved rounds")
        print_table("default allocator", interleaved_medians(paths, repeats))
    else:
        print_table("attnjax.tune_host_allocator() at process start (applies to both)",
                    interleaved_medians(paths, repeats))

if __name__ == "__main__":
    main()
