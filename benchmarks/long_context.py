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

Decoder section (``--decoder``): a whole model instead of one layer. Random weights
with SmolLM-135M's shapes (hidden 576, 9 query heads, 3 kv heads, head_dim 64,
intermediate 1536, vocabulary 49152, tied head; --layers of them, 4 by default,
max_position_embeddings raised to 32768), written in Hugging Face layout
(config.json + model.safetensors, built with numpy, no torch) and loaded with
``attnjax.load``. Each T runs ``Capture(stats=True, pool=64)``, the plain forward
(``Capture()``), and ``scores``: ``Capture(stats=True, qkv=True)`` then
``analysis.head_scores`` (every column, induction and duplicate recomputed from q, k
and lse), all with ``logits="none"``, in fresh subprocesses: peak RSS and time of each, with one dense (heads, T, T) float32 attention matrix per layer
beside them for contrast.

    python benchmarks/long_context.py --decoder --lengths 4096 16384 32768
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

MODES = ("forward", "stats", "stats+pool", "reference", "scores")
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


# SmolLM-135M's shapes (HuggingFaceTB/SmolLM-135M config.json), positions raised so
# one document of up to 32k tokens fits.
SMOLLM_SHAPES = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
    num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=0, torch_dtype="float32",
)


def write_decoder(directory: str, layers: int) -> None:
    """A random SmolLM-135M-shaped Llama checkpoint (float32 safetensors) in directory."""
    import numpy as np
    from safetensors.numpy import save_file

    config = dict(SMOLLM_SHAPES, num_hidden_layers=layers)
    rng = np.random.default_rng(0)
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv_width = config["num_key_value_heads"] * head_dim

    def normal(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors.update({
            prefix + "self_attn.q_proj.weight": normal(hidden, hidden),
            prefix + "self_attn.k_proj.weight": normal(kv_width, hidden),
            prefix + "self_attn.v_proj.weight": normal(kv_width, hidden),
            prefix + "self_attn.o_proj.weight": normal(hidden, hidden),
            prefix + "mlp.gate_proj.weight": normal(inner, hidden),
            prefix + "mlp.up_proj.weight": normal(inner, hidden),
            prefix + "mlp.down_proj.weight": normal(hidden, inner),
            prefix + "input_layernorm.weight": np.ones(hidden, np.float32),
            prefix + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        })
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def decoder_child(args) -> dict:
    """Load the decoder, run one mode at one length in this fresh process."""
    import jax
    import numpy as np

    import attnjax
    from attnjax import Capture, analysis

    model = attnjax.load(args.model_dir)
    ids = np.random.default_rng(1).integers(1, model.config.vocab_size, (1, args.length), dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool)
    capture = {"stats": Capture(stats=True, pool=args.pool),
               "scores": Capture(stats=True, qkv=True)}.get(args.mode, Capture())

    def work():  # "scores": the forward, then every head score, induction included (from q, k, lse)
        output, trace = model.jit_forward(model.params, ids, mask, capture=capture, logits="none")
        jax.block_until_ready((output, trace))
        return trace, (analysis.head_scores(trace) if args.mode == "scores" else None)

    jax.block_until_ready(model.params)
    baseline_mib = _rss_peak_mib()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    work()
    first_wall = time.perf_counter() - wall0
    cpu1, wall1 = _cpu_seconds(), time.perf_counter()
    trace, scores = work()
    result = dict(peak_rss_mib=_rss_peak_mib(), baseline_rss_mib=baseline_mib,
                  first_wall_s=first_wall, first_cpu_s=cpu1 - cpu0,
                  wall_s=time.perf_counter() - wall1, cpu_s=_cpu_seconds() - cpu1)
    if args.mode == "stats":
        entropy = np.asarray(trace.stats.entropy)  # (L, B, H, T)
        result["finite"] = bool(np.isfinite(entropy).all())
        result["pooled_shape"] = list(trace.stats.pooled.shape)
    if args.mode == "scores":
        result["induction_max"] = float(scores["induction"].max())
        result["finite"] = bool(np.isfinite(scores[["induction", "duplicate", "entropy"]].to_numpy()).all())
    return result


def run_decoder(args, root) -> None:
    import tempfile

    directory = args.model_dir or tempfile.mkdtemp(prefix="attnjax-smollm-")
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        write_decoder(directory, args.layers)
    args.model_dir = directory
    heads, layers = SMOLLM_SHAPES["num_attention_heads"], args.layers
    print(f"# long_context --decoder: random SmolLM-135M shapes, {layers} layers, {heads} query heads / "
          f"{SMOLLM_SHAPES['num_key_value_heads']} kv heads, float32, batch 1, causal, "
          f"Capture(stats=True, pool={args.pool}) vs Capture(), logits='none'; second call timed")
    print(f"# machine: {machine_description()}")
    print()
    header = ("| T | mode | wall s | CPU s | CPU x forward | first call s (compile + run) | peak RSS MiB "
              "| RSS after load MiB | dense attention, one layer, f32 MiB |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for length in args.lengths:
        dense_mib = heads * length * length * 4 / MIB
        results = {}
        for mode in ("forward", "stats", "scores"):
            try:
                results[mode] = _run(args, root, "decoder", "--length", str(length), "--mode", mode,
                                     "--model-dir", directory)
            except RuntimeError as error:
                print(f"| {length} | {mode} | failed: {error} | | | | | | |", flush=True)
                continue
            result = results[mode]
            ratio = (f"{result['cpu_s'] / results['forward']['cpu_s']:.2f}"
                     if mode != "forward" and "forward" in results else "-")
            print(f"| {length} | {mode} | {result['wall_s']:.1f} | {result['cpu_s']:.1f} | {ratio} "
                  f"| {result['first_wall_s']:.1f} | {result['peak_rss_mib']:.0f} "
                  f"| {result['baseline_rss_mib']:.0f} | {dense_mib:.0f} |", flush=True)


def _run(args, root, *extra) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", *extra,
               "--layers", str(args.layers), "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--batch", str(args.batch),
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
    parser.add_argument("--decoder", action="store_true",
                        help="profile a whole SmolLM-135M-shaped decoder instead of one layer")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (--decoder)")
    parser.add_argument("--model-dir", help="reuse (or write) the random decoder checkpoint here")
    parser.add_argument("--child", choices=["memory", "timing", "decoder"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decoder and args.lengths == parser.get_default("lengths"):
        args.lengths = [4096, 16384, 32768]

    if args.child == "memory":
        print(json.dumps(memory_child(args)))
        return
    if args.child == "timing":
        print(json.dumps(timing_child(args)))
        return
    if args.child == "decoder":
        print(json.dumps(decoder_child(args)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.decoder:
        run_decoder(args, root)
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
