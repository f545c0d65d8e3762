"""Streaming attention statistics at long context on CPU: peak memory and time.

One layer-sized call (batch 1, 12 heads, head_dim 64, float32, no mask) of
``attnjax.kernels.blockwise_attention`` at T = 2k, 8k, 16k, in three modes:

- ``forward``     the output only (the baseline);
- ``stats``       output + AttentionStats (row statistics, received, diagonal masses);
- ``stats+pool``  the same plus a P x P pooled attention map (P = 64);

and, at T <= --reference-max, ``reference`` (the dense T x T path with statistics)
for contrast. Each (T, mode) runs in a fresh subprocess so that its peak resident
memory (``ru_maxrss``) is its own; the table also shows the process's resident
memory before compiling (JAX runtime + inputs), XLA's own temp-buffer estimate
(``compiled.memory_analysis()``), and what one dense float32 (heads, T, T) attention
matrix would take. Times are wall-clock and process CPU time (all threads), the
minimum over --repeats runs after one warm-up; on a shared machine CPU time is the
steadier of the two.

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


def run_child(args) -> dict:
    """Measure one (length, mode) in this process; returns the row as a dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from attnjax.kernels import blockwise_attention, reference_attention

    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.heads, args.head_dim)  # (B, T, N, H)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(3))
    jax.block_until_ready((q, k, v))
    baseline_mib = _rss_peak_mib()

    if args.mode == "reference":
        fn = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=args.causal, stats=True))
    else:
        stats = args.mode != "forward"
        pool = args.pool if args.mode == "stats+pool" else None
        fn = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, causal=args.causal, stats=stats, pool=pool))
    start = time.perf_counter()
    compiled = fn.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    walls, cpus = [], []
    for _ in range(args.repeats):
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        walls.append(time.perf_counter() - wall0)
        cpus.append(_cpu_seconds() - cpu0)
    return dict(
        length=args.length, mode=args.mode, compile_s=compile_s,
        wall_s=min(walls), cpu_s=min(cpus),
        peak_rss_mib=_rss_peak_mib(), baseline_rss_mib=baseline_mib,
        xla_temp_mib=getattr(memory, "temp_size_in_bytes", 0) / MIB if memory else float("nan"),
    )


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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-max", type=int, default=2048,
                        help="also run the dense reference at lengths up to this")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args)))
        return

    print(f"# long_context: batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, float32, "
          f"{'causal' if args.causal else 'non-causal'}, no mask, pool {args.pool}")
    print(f"# machine: {machine_description()}")
    print()
    header = ("| T | mode | wall s | CPU s | CPU x forward | peak RSS MiB | RSS before compile MiB "
              "| XLA temp MiB | dense (H,T,T) f32 MiB |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for length in args.lengths:
        modes = [m for m in MODES if m != "reference" or length <= args.reference_max]
        forward_cpu = None
        for mode in modes:
            command = [sys.executable, os.path.abspath(__file__), "--child", "--length", str(length),
                       "--mode", mode, "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                       "--batch", str(args.batch), "--pool", str(args.pool), "--repeats", str(args.repeats)]
            if args.causal:
                command.append("--causal")
            env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {length} | {mode} | failed: {tail[:120]} | | | | | | |", flush=True)
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            if mode == "forward":
                forward_cpu = row["cpu_s"]
            ratio = f"{row['cpu_s'] / forward_cpu:.2f}" if forward_cpu else "-"
            dense_mib = args.batch * args.heads * length * length * 4 / MIB
            print(f"| {length} | {mode} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {ratio} "
                  f"| {row['peak_rss_mib']:.0f} | {row['baseline_rss_mib']:.0f} | {row['xla_temp_mib']:.0f} "
                  f"| {dense_mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
