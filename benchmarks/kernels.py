"""Attention forward throughput on GPU (TFLOP/s), bf16: ours against JAX's kernels.

For head_dim 64 and 128, causal and not, T = 1k .. 16k, with batch * T = 16k tokens
and heads * head_dim = 2048 (the FlashAttention papers' setting), it times:

- ``attnjax pallas``        attnjax.kernels.pallas_attention (Triton), output only;
- ``attnjax pallas+stats``  the same call with stats=True (row statistics in the
                            forward, the column pass for ``received``, diagonal masses);
- ``jax xla``               jax.nn.dot_product_attention(implementation="xla");
- ``jax cudnn``             jax.nn.dot_product_attention(implementation="cudnn");
- ``jax pallas mha``        jax.experimental.pallas.ops.gpu.attention.mha (Triton).

FLOPs are counted as 4 * B * H * T^2 * D (QK^T and PV), halved under causal, for
every column, so "+stats" shows the statistics' cost as lost throughput. Each entry
is the median over --repeats timed batches of --iters calls after a warm-up. Before
timing, our output is checked against jax.nn.dot_product_attention at T = 1024.

GPU only: on another backend the script says so and exits. It needs no network.

    python benchmarks/kernels.py
    python benchmarks/kernels.py --lengths 1024 4096 --head-dims 128
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

TOKENS = 16384
HIDDEN = 2048


def _jax_pallas_mha():
    """JAX's own Triton flash attention, or None where this JAX no longer ships it."""
    try:
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(gpu_attention, "mha", None)


def implementations(causal: bool, head_dim: int):
    """name -> jitted f(q, k, v) for q, k, v (B, T, N, H) bf16."""
    from attnjax.kernels import pallas_attention

    scale = 1.0 / math.sqrt(head_dim)
    table = {
        "attnjax pallas": lambda q, k, v: pallas_attention(q, k, v, causal=causal, scale=scale),
        "attnjax pallas+stats": lambda q, k, v: pallas_attention(q, k, v, causal=causal, scale=scale, stats=True),
        "jax xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, implementation="xla"),
        "jax cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, implementation="cudnn"),
    }
    mha = _jax_pallas_mha()
    if mha is not None:
        table["jax pallas mha"] = lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=causal)
    return {name: jax.jit(fn) for name, fn in table.items()}


def time_call(fn, args, iters: int, repeats: int) -> float:
    """Median seconds per call over ``repeats`` batches of ``iters`` back-to-back calls."""
    jax.block_until_ready(fn(*args))  # compile + warm-up
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / iters)
    return statistics.median(per_call)


def make_inputs(length: int, head_dim: int, seed: int = 0):
    batch, heads = max(1, TOKENS // length), HIDDEN // head_dim
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (batch, length, heads, head_dim)  # (B, T, N, H)
    return tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in keys)


def check_outputs(head_dims, causal_values) -> None:
    """Our forward against jax.nn.dot_product_attention (xla) at T = 1024, bf16."""
    from attnjax.kernels import pallas_attention

    for head_dim in head_dims:
        for causal in causal_values:
            q, k, v = make_inputs(1024, head_dim, seed=1)
            ours = pallas_attention(q, k, v, causal=causal).astype(jnp.float32)
            with jax.default_matmul_precision("highest"):
                expected = jax.nn.dot_product_attention(
                    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=causal)
            error = float(jnp.max(jnp.abs(ours - expected)))
            status = "ok" if error < 3e-2 else "MISMATCH"
            print(f"# check head_dim={head_dim} causal={causal}: max |ours - xla| = {error:.2e} ({status})")
            if status != "ok":
                sys.exit("attnjax pallas output does not match jax.nn.dot_product_attention; not timing it.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    backend = jax.default_backend()
    if backend != "gpu":
        sys.exit(f"benchmarks/kernels.py measures GPU kernels; JAX's default backend here is "
                 f"'{backend}'. Run it on a machine with an NVIDIA GPU (jax[cuda]).")

    causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    device = jax.devices()[0]
    print(f"# kernels: forward, bf16, batch * T = {TOKENS}, heads * head_dim = {HIDDEN}")
    print(f"# device: {getattr(device, 'device_kind', device)}, jax {jax.__version__}")
    if _jax_pallas_mha() is None:
        print("# jax.experimental.pallas.ops.gpu.attention.mha is not available in this JAX: column omitted")
    check_outputs(args.head_dims, causal_values)

    names = list(implementations(False, args.head_dims[0]))
    print()
    print("| head_dim | causal | T | batch x heads | " + " | ".join(names) + " |")
    print("|" + "---|" * (4 + len(names)))
    for head_dim in args.head_dims:
        for causal in causal_values:
            fns = implementations(causal, head_dim)
            for length in args.lengths:
                q, k, v = make_inputs(length, head_dim)
                batch, _, heads, _ = q.shape
                flops = 4 * batch * heads * length * length * head_dim / (2 if causal else 1)
                cells = []
                for name in names:
                    try:
                        seconds = time_call(fns[name], (q, k, v), args.iters, args.repeats)
                        cells.append(f"{flops / seconds / 1e12:.0f}")
                    except Exception as error:  # noqa: BLE001 - report and keep going
                        message = str(error).splitlines()[0] if str(error) else type(error).__name__
                        cells.append("OOM" if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
                                     else f"error: {message[:60]}")
                print(f"| {head_dim} | {causal} | {length} | {batch}x{heads} | " + " | ".join(cells) + " |",
                      flush=True)
                del q, k, v


if __name__ == "__main__":
    main()
