"""A whole decoder on the accelerator (benchmarks/gpu_check.sh, step 4).

The kernel tests check the Pallas kernels alone; this runs them where users meet
them, inside a model. A random SmolLM-135M-shaped Llama (benchmarks/long_context.py's
writer: 9 query heads, 3 kv heads, head_dim 64; --layers of them) on --length random
tokens (random, then repeated: Olsson et al.'s induction input):

1. forward with Capture(stats=True, qkv=True), attention_impl "auto" (the Pallas
   kernel where it compiles) and "blockwise" (XLA): wall time of a second call each,
   and the largest difference of the statistics (lse, entropy, max_prob, received);
2. head_scores on both Traces, next_token / duplicate / induction included
   (recomputed from q, k and lse, attnjax/analysis/_qk_terms.py): the largest
   difference of every score column;
3. attnjax.generate of 8 tokens after a --prompt-token prompt with Capture(stats=True)
   (the prefill runs the model's own kernel): wall time, and whether its greedy ids
   equal the argmax of a full forward over the same ids.

Exit status 1 when a difference is over its tolerance (float32 kernels summing in
different orders: 2e-3 on statistics and scores, which are means of O(1) numbers) or
the ids differ; 0 otherwise. Without a GPU it refuses unless --allow-cpu (the test
suite runs it that way at small sizes, so the script keeps working).

    python benchmarks/gpu_model_check.py [--length 4096] [--prompt 2040] [--layers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from long_context import write_decoder  # noqa: E402  (beside this script)

TOLERANCE = 2e-3
NEW_TOKENS = 8
STATS = ("lse", "entropy", "max_prob", "received")


def timed(call):
    """(result of the second call, its wall seconds): the first one compiles."""
    import jax

    jax.block_until_ready(call())
    start = time.perf_counter()
    result = jax.block_until_ready(call())
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=2040)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test of this script)")
    args = parser.parse_args(argv)
    import jax

    import attnjax
    from attnjax import Capture, analysis

    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        print(f"no GPU here (backend {backend}); pass --allow-cpu to run this check anyway")
        return 2
    failures = []
    with tempfile.TemporaryDirectory() as directory:
        write_decoder(directory, args.layers)
        model = attnjax.load(directory)
        # Random tokens, then the same again (Olsson et al.'s induction input): repeats to score.
        half = np.random.default_rng(0).integers(1, model.config.vocab_size, (1, -(-args.length // 2)), np.int32)
        ids = np.concatenate([half, half], axis=1)[:, :args.length]                   # (1, length)
        capture = Capture(stats=True, qkv=True)
        traces, heads = {}, {}
        print(f"backend {backend}; {args.layers}-layer SmolLM-shaped decoder, {args.length} tokens")
        for impl in ("auto", "blockwise"):
            (_, trace), seconds = timed(lambda: model.jit_forward(model.params, ids, capture=capture,
                                                                  attention_impl=impl, logits="none"))
            traces[impl] = trace
            start = time.perf_counter()
            heads[impl] = analysis.head_scores(trace)
            print(f"  forward, Capture(stats=True, qkv=True), impl {impl:<9}: {seconds:7.3f} s; "
                  f"head_scores {time.perf_counter() - start:6.2f} s")
        for name in STATS:
            difference = float(np.max(np.abs(np.asarray(getattr(traces["auto"].stats, name), np.float64)
                                              - np.asarray(getattr(traces["blockwise"].stats, name), np.float64))))
            print(f"  stats {name:<10} auto vs blockwise: max |difference| {difference:.2e}")
            if not difference <= TOLERANCE:
                failures.append(f"stats.{name} differs by {difference:.2e}")
        columns = [c for c in analysis.SCORE_COLUMNS if heads["auto"][c].notna().any()]
        differences = (heads["auto"][columns] - heads["blockwise"][columns]).abs().max()
        print(f"  head_scores auto vs blockwise: max |difference| {differences.max():.2e} over {len(columns)} "
              f"columns; induction {heads['auto']['induction'].max():.3f} at most")
        for column, difference in differences.items():
            if not difference <= TOLERANCE:
                failures.append(f"head_scores {column} differs by {difference:.2e}")
        if {"induction", "duplicate"} - set(columns):
            failures.append("induction / duplicate are NaN: the q, k recomputation did not run")

        prompt = ids[0, :args.prompt]
        start = time.perf_counter()
        generation = attnjax.generate(model, prompt, max_new_tokens=NEW_TOKENS, capture=Capture(stats=True),
                                      progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        attnjax.generate(model, prompt, max_new_tokens=NEW_TOKENS, capture=Capture(stats=True), progress=False)
        second = time.perf_counter() - start
        output, _ = model.jit_forward(model.params, generation.ids[None, :-1])
        logits = np.asarray(output.logits[0, args.prompt - 1:], np.float64)            # (new, V)
        chosen = logits[np.arange(NEW_TOKENS), generation.new_ids]
        # A random model's logits are close together: a chosen id counts as the argmax when
        # its full-forward logit is within float32 noise of the largest.
        best = logits.max(-1)
        same = int(np.sum(chosen >= best - 1e-4 * np.maximum(1.0, np.abs(best))))
        print(f"  generate {NEW_TOKENS} tokens after {args.prompt}, Capture(stats=True): first {first:.2f} s, "
              f"second {second:.2f} s; {same}/{NEW_TOKENS} ids are a full forward's argmax")
        if same != NEW_TOKENS:
            failures.append(f"generate: {NEW_TOKENS - same} of {NEW_TOKENS} ids are not the full forward's argmax")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("model check: " + ("ok" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
