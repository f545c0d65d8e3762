"""Corpus profiling speed: attnjax.profile against transformers + numpy, on 1/2/4 devices.

The bundled MiniLM over N texts (default 2,000) of mixed lengths, 8 to 256 tokens:

- attnjax:  attnjax.profile(model, texts, batch_size=32): length buckets, a background
            tokeniser, one jitted step per batch (forward with streaming statistics and
            the per-text score sums: entropy, normalized_entropy, max_weight, self,
            previous_token, first_token, cls, sep, punctuation, mean_distance, and the
            anomaly scores concentrated and jump), float64 sums on the host;
- the usual way: transformers' BertModel (eager, output_attentions=True) on batches of
            32 texts in corpus order padded to the batch's longest, the attentions as
            numpy, then the same ten scores in numpy float32 as sums and counts (not the
            two anomaly scores: the baseline does less work than attnjax).

Both are timed after a warm-up on 96 other texts that reach every length bucket
(the warm-up time, compilation included, is printed apart).
Then attnjax on 1, 2 and 4 devices (each in a fresh process; on a CPU the devices
are fake, XLA_FLAGS=--xla_force_host_platform_device_count, and SHARE THE SAME CORES,
so this shows the sharded path's overhead, not a speed-up), and the peak RSS of a
fresh process profiling 500 and 2,000 texts from a generator (memory must stay flat).
On a GPU the same script runs attnjax on the GPU (the torch baseline stays on CPU).

    python benchmarks/profile_corpus.py [--texts 2000] [--devices 1,2,4] [--device-texts N] [--memory 500,2000] [--no-torch]
    python benchmarks/profile_corpus.py --texts 0 --devices "" --memory 500,2000     # memory only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from forward import SENTENCES  # noqa: E402  (benchmarks/forward.py, beside this script)

BATCH = 32
WARM_UP = 96  # texts run before timing (compiles every bucket's step / warms torch)
COLUMNS = ("entropy", "normalized_entropy", "max_weight", "self", "previous_token", "first_token", "cls", "sep",
           "punctuation", "mean_distance")


def corpus(count: int, seed: int = 0):
    """``count`` texts of about 6 to 200 words (8 to 256 MiniLM tokens), a generator."""
    rng = np.random.default_rng(seed)
    words = " ".join(SENTENCES).split()
    for _ in range(count):
        length = int(rng.integers(6, 200))
        start = int(rng.integers(0, len(words)))
        yield " ".join(words[(start + i) % len(words)] for i in range(length))


def run_attnjax(count: int, devices: bool) -> dict:
    import jax

    import attnjax

    mesh = attnjax.data_mesh() if devices else None
    model = attnjax.load("minilm", mesh=mesh)
    started = time.perf_counter()  # warm-up: 96 other texts reach every length bucket (16 ... 256)
    attnjax.profile(model, corpus(WARM_UP, seed=1), batch_size=BATCH, max_length=256, mesh=mesh, progress=False)
    first = time.perf_counter() - started
    started = time.perf_counter()
    frame = attnjax.profile(model, corpus(count), batch_size=BATCH, max_length=256, mesh=mesh, progress=False)
    seconds = time.perf_counter() - started
    return {"devices": jax.device_count(), "backend": jax.default_backend(), "first": first, "seconds": seconds,
            "texts": int(frame["n_texts"].iloc[0]), "tokens": int(frame["n_tokens"].iloc[0]),
            "means": {c: frame[c].tolist() for c in COLUMNS}}


def numpy_sums(attention: np.ndarray, mask: np.ndarray, classes: np.ndarray, sums: dict, counts: dict) -> None:
    """Add one batch's score sums (L, H) and eligible counts; attention (L, B, H, T, T) float32."""
    seq = mask.shape[1]
    position = np.arange(seq)
    distance = np.abs(position[:, None] - position[None, :]).astype(np.float32)  # (T, T)
    query = mask.astype(np.float32)  # (B, T)
    previous = (mask & np.pad(mask[:, :-1], ((0, 0), (1, 0)))).astype(np.float32)  # (B, T)
    n_visible = mask.sum(1, keepdims=True) * np.ones_like(query)  # (B, T)
    spread = (mask & (n_visible >= 2)).astype(np.float32)
    log_visible = np.log(np.maximum(n_visible, 2.0)).astype(np.float32)
    for name, weight in (("query", query), ("previous", previous), ("spread", spread)):
        counts[name] = counts.get(name, 0.0) + float(weight.sum())
    p = attention  # (L, B, H, T, T)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(-1)  # (L, B, H, T)
    prev = np.zeros_like(entropy)
    prev[..., 1:] = p[..., position[1:], position[1:] - 1]
    terms = {
        "entropy": (entropy, query), "normalized_entropy": (entropy / log_visible[None, :, None, :], spread),
        "max_weight": (p.max(-1), query), "self": (np.einsum("lbhii->lbhi", p), query),
        "previous_token": (prev, previous), "first_token": (p[..., 0], query),
        "cls": (np.einsum("lbhqk,bk->lbhq", p, classes[0]), query),
        "sep": (np.einsum("lbhqk,bk->lbhq", p, classes[1]), query),
        "punctuation": (np.einsum("lbhqk,bk->lbhq", p, classes[2]), query),
        "mean_distance": (np.einsum("lbhqk,qk->lbhq", p, distance), query),
    }
    for name, (value, weight) in terms.items():
        sums[name] = sums.get(name, 0.0) + np.einsum("lbhq,bq->lh", value, weight).astype(np.float64)


def run_transformers(count: int) -> dict:
    import torch
    import transformers

    from attnjax.models.checkpoints import resolve

    torch.set_num_threads(os.cpu_count() or 1)
    directory = str(resolve("minilm"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    marks = {0: {"[CLS]"}, 1: {"[SEP]"}, 2: {".", ","}}
    ids_of = {k: {tokenizer.convert_tokens_to_ids(t) for t in v} for k, v in marks.items()}

    def once(size: int = count) -> tuple:
        sums, counts, texts, tokens = {}, {}, 0, 0
        batch = []
        for text in list(corpus(size)) + [None]:
            if text is not None:
                batch.append(text)
            if len(batch) == BATCH or (text is None and batch):
                encoded = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
                with torch.no_grad():
                    out = model(**encoded, output_attentions=True)
                attention = np.stack([a.numpy() for a in out.attentions])  # (L, B, H, T, T)
                mask = encoded["attention_mask"].numpy().astype(bool)
                ids = encoded["input_ids"].numpy()
                classes = np.stack([np.isin(ids, list(ids_of[k])) & mask for k in range(3)]).astype(np.float32)
                numpy_sums(attention, mask, classes, sums, counts)
                texts, tokens, batch = texts + len(mask), tokens + int(mask.sum()), []
        eligible = {"entropy": "query", "normalized_entropy": "spread", "previous_token": "previous"}
        means = {name: (value / counts[eligible.get(name, "query")]).ravel().tolist() for name, value in sums.items()}
        return texts, tokens, means

    started = time.perf_counter()
    once(WARM_UP)
    first = time.perf_counter() - started
    started = time.perf_counter()
    texts, tokens, means = once()
    return {"first": first, "seconds": time.perf_counter() - started, "texts": texts, "tokens": tokens,
            "means": means}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss(count: int) -> dict:
    """Peak RSS while profiling: loading the model peaks higher than profiling does, so the
    peak is reset after loading (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    import attnjax

    model = attnjax.load("minilm")
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _status_mb("VmRSS")
    attnjax.profile(model, corpus(count), batch_size=BATCH, max_length=256, progress=False)
    return {"texts": count, "load_peak_mb": load_peak, "rss_before_mb": before, "reset": reset,
            "peak_rss_mb": _status_mb("VmHWM"), "rss_after_mb": _status_mb("VmRSS")}


def in_subprocess(mode: str, count: int, devices: int = 1) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import jax

    if jax.default_backend() == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run([sys.executable, __file__, "--worker", mode, "--texts", str(count)], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"worker {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rate(run: dict) -> str:
    return f"{run['texts'] / run['seconds']:8.1f} texts/s {run['tokens'] / run['seconds']:9.0f} tokens/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--devices", default="1,2,4", help="device counts for the sharding table ('' skips it)")
    parser.add_argument("--device-texts", type=int, help="texts for the sharding table (default --texts)")
    parser.add_argument("--memory", default="500,2000", help="corpus sizes for peak RSS ('' skips it)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "devices":
        print(json.dumps(run_attnjax(args.texts, devices=True)))
        return
    if args.worker == "memory":
        print(json.dumps(peak_rss(args.texts)))
        return

    import jax

    print(f"MiniLM, {args.texts} texts of 8-256 tokens, batch {BATCH}; backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    if args.texts:
        ours = run_attnjax(args.texts, devices=False)
        print(f"attnjax.profile           {rate(ours)}   (warm-up with compilation {ours['first']:.1f} s, "
              f"timed run {ours['seconds']:.1f} s, {ours['tokens']} tokens)")
    if args.texts and not args.no_torch:
        theirs = run_transformers(args.texts)
        print(f"transformers + numpy      {rate(theirs)}   (timed run {theirs['seconds']:.1f} s, "
              f"{theirs['tokens']} tokens)")
        print(f"speed-up (texts/s)        {theirs['seconds'] / ours['seconds']:.2f}x   (target >= 3x)")
        worst = max(float(np.nanmax(np.abs(np.asarray(ours["means"][c]) - np.asarray(theirs["means"][c]))))
                    for c in COLUMNS)
        print(f"largest |difference| of the ten score columns between the two: {worst:.2e}")
    if args.devices:
        note = " (fake CPU devices sharing the same cores)" if jax.default_backend() == "cpu" else ""
        print(f"\nattnjax.profile on a data mesh{note}:")
        for devices in [int(d) for d in args.devices.split(",")]:
            run = in_subprocess("devices", args.device_texts or args.texts, devices)
            print(f"  {run['devices']} device(s) [{run['backend']}]  {rate(run)}   (warm-up {run['first']:.1f} s)")
    if args.memory:
        print("\nPeak RSS of a fresh process profiling a generator of N texts:")
        for count in [int(c) for c in args.memory.split(",")]:
            run = in_subprocess("memory", count)
            print(f"  {count:6d} texts: {run['peak_rss_mb']:7.0f} MB peak while profiling (RSS {run['rss_before_mb']:.0f} MB "
                  f"before, {run['rss_after_mb']:.0f} MB after; loading the model peaked at {run['load_peak_mb']:.0f} MB"
                  f"{'' if run['reset'] else '; peak not reset: it includes loading'})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
