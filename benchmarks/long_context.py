"""Streaming attention statistics at long context on CPU: peak memory and time.

One layer-sized call (batch 1, 12 heads, head_dim 64, float32, no mask) of
``attnjax.kernels.blockwise_attention`` at T = 2k, 8k, 16k, in three modes:

- ``forward``     the output only (the baseline);
- ``stats``       output + AttentionStats (row statistics, received, diagonal masses);
- ``stats+pool``  the same plus a P x P pooled attention map (P = 64);

and, at T <= --reference-max, ``reference`` (the dense T x T path with statistics)
for contrast.

Memory: each (T, mode) is compiled and run once in a fresh subprocess, so its peak
resident memory (``ru_maxrss``, which includes compiling) is its own. The table also
shows the resident memory before compiling (JAX runtime + inputs), XLA's temp-buffer
estimate (``compiled.memory_analysis()``) and what one dense float32 (heads, T, T)
attention matrix would take.

Time: per T, one subprocess compiles the three blockwise modes and runs them
round-robin --repeats times after a warm-up; each mode reports its minimum wall
time and process CPU time (all threads). Interleaving keeps the modes' ratios fair
when other work shares the machine; CPU time is the steadier of the two there.

    python benchmarks/long_context.py                      # the table in RESULTS.md
    python benchmarks/long_context.py --lengths 2048 4096  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODES = ("forward", "stats", "stats+pool", "reference")
MIB = 2 ** 20


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _inputs(args, length):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (args.batch, length, args.heads, args.head_dim)  # (B, T, N, H)
    return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(3))


def _compiled(mode, args, q, k, v):
    import jax

    from attnjax.kernels import blockwise_attention, reference_attention

    if mode == "reference":
        fn = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=args.causal, stats=True))
    else:
        stats = mode != "forward"
        pool = args.pool if mode == "stats+pool" else None
        fn = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, causal=args.causal, stats=stats, pool=pool))
    return fn.lower(q, k, v).compile()


def memory_child(args) -> dict:
    """Peak memory of one (length, mode), measured in this fresh process."""
    import jax

    q, k, v = _inputs(args, args.length)
    jax.block_until_ready((q, k, v))
    baseline_mib = _rss_peak_mib()
    compiled = _compiled(args.mode, args, q, k, v)
    memory = compiled.memory_analysis()
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    return dict(
        peak_rss_mib=_rss_peak_mib(), baseline_rss_mib=baseline_mib,
        first_run_s=time.perf_counter() - start,
        xla_temp_mib=getattr(memory, "temp_size_in_bytes", 0) / MIB if memory else float("nan"),
    )


def timing_child(args) -> dict:
    """Min wall / CPU seconds per blockwise mode at one length, modes run round-robin."""
    import jax

    q, k, v = _inputs(args, args.length)
    modes = ("forward", "stats", "stats+pool")
    compiled = {mode: _compiled(mode, args, q, k, v) for mode in modes}
    for mode in modes:
        jax.block_until_ready(compiled[mode](q, k, v))  # warm-up
    walls = {mode: [] for mode in modes}
    cpus = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            jax.block_until_ready(compiled[mode](q, k, v))
            walls[mode].append(time.perf_counter() - wall0)
            cpus[mode].append(_cpu_seconds() - cpu0)
    return {mode: dict(wall_s=min(walls[mode]), cpu_s=min(cpus[mode])) for mode in modes}


def _run(args, root, *extra) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", *extra,
               "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--batch", str(args.batch),
               "--pool", str(args.pool), "--repeats", str(args.repeats)]
    if args.causal:
        command.append("--causal")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(tail[:160])
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine_description() -> str:
    import jax

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, jax {jax.__version__}, backend {jax.default_backend()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-max", type=int, default=2048,
                        help="also run the dense reference at lengths up to this")
    parser.add_argument("--child", choices=["memory", "timing"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "memory":
        print(json.dumps(memory_child(args)))
        return
    if args.child == "timing":
        print(json.dumps(timing_child(args)))
        return

    print(f"# long_context: batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, float32, "
          f"{'causal' if args.causal else 'non-causal'}, no mask, pool {args.pool}, "
          f"min of {args.repeats} interleaved runs")
    print(f"# machine: {machine_description()}")
    print()
    header = ("| T | mode | wall s | CPU s | CPU x forward | peak RSS MiB | RSS before compile MiB "
              "| XLA temp MiB | dense (H,T,T) f32 MiB |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for length in args.lengths:
        dense_mib = args.batch * args.heads * length * length * 4 / MIB
        try:
            timing = _run(args, root, "timing", "--length", str(length))
        except RuntimeError as error:
            print(f"| {length} | timing failed: {error} | | | | | | | |", flush=True)
            continue
        modes = [m for m in MODES if m != "reference" or length <= args.reference_max]
        for mode in modes:
            try:
                memory = _run(args, root, "memory", "--length", str(length), "--mode", mode)
            except RuntimeError as error:
                print(f"| {length} | {mode} | failed: {error} | | | | | | |", flush=True)
                continue
            if mode in timing:
                wall, cpu = timing[mode]["wall_s"], timing[mode]["cpu_s"]
                ratio = f"{cpu / timing['forward']['cpu_s']:.2f}"
            else:  # the dense reference: one run, from the memory process
                wall, cpu, ratio = memory["first_run_s"], float("nan"), "-"
            cpu_text = "-" if cpu != cpu else f"{cpu:.2f}"
            print(f"| {length} | {mode} | {wall:.2f} | {cpu_text} | {ratio} "
                  f"| {memory['peak_rss_mib']:.0f} | {memory['baseline_rss_mib']:.0f} "
                  f"| {memory['xla_temp_mib']:.0f} | {dense_mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
