"""Attention forward throughput on GPU (TFLOP/s), bf16: ours against JAX's kernels.

For head_dim 128 and 64, causal and not, T = 1k .. 16k, with batch * T = 16k tokens
and heads * head_dim = 2048 (the FlashAttention papers' setting), it times:

- ``attnjax pallas``        attnjax.kernels.pallas_attention (Triton), output only;
- ``attnjax pallas+stats``  the same call with stats=True (row statistics in the
                            forward, the column pass for ``received``, diagonal masses);
- ``jax xla``               jax.nn.dot_product_attention(implementation="xla");
- ``jax cudnn``             jax.nn.dot_product_attention(implementation="cudnn");
- ``jax pallas mha``        jax.experimental.pallas.ops.gpu.attention.mha (Triton), where
                            this JAX still ships it (MHA rows only).

Then the decoder rows: grouped-query attention (16 query heads on 4 kv heads,
head_dim 128, causal), once plain and once with a sliding window of 4096 keys
(--window), the shapes of Llama/Mistral-style layers.

FLOPs are counted as 4 * B * Hq * D per visible (query, key) pair (QK^T and PV):
T^2 without a mask, T(T+1)/2 causal, fewer with a window. Every column uses the same
count, so "+stats" shows the statistics' cost as lost throughput; the last two
columns are ``pallas / cudnn`` and the statistics' overhead ``stats / plain - 1`` in
time. Each entry is the median over --repeats timed batches of --iters calls after a
warm-up. Before timing, our output is checked against jax.nn.dot_product_attention at
T = 1024.

    python benchmarks/kernels.py                      # the table (GPU)
    python benchmarks/kernels.py --auto               # what impl="auto" picks here, and why
    python benchmarks/kernels.py --lengths 1024 4096 --head-dims 128 --budget-s 120
    python benchmarks/kernels.py --allow-cpu --tokens 256 --hidden 128 --lengths 128 \\
        --head-dims 64 --iters 1 --repeats 1          # dry run of the script on CPU

On a CPU (--allow-cpu) the Pallas columns run in the interpreter and the cuDNN column
fails: that mode checks the script, not the kernels' speed. It needs no network.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

GQA_HEADS = (16, 4)  # query heads, kv heads of the decoder rows (head_dim 128)
GQA_HEAD_DIM = 128


def _jax_pallas_mha():
    """JAX's own Triton flash attention, or None where this JAX no longer ships it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(gpu_attention, "mha", None)


def implementations(causal: bool, head_dim: int, window=None, grouped: bool = False, jax_mha: bool = True):
    """name -> jitted f(q, k, v) for q (B, T, Hq, D), k and v (B, T, Hkv, D), bf16."""
    from attnjax.kernels import pallas_attention

    scale = 1.0 / math.sqrt(head_dim)
    local = None if window is None else (window - 1, 0)  # jax: keys i - left .. i + right
    options = dict(causal=causal, scale=scale, window=window)
    table = {
        "attnjax pallas": lambda q, k, v: pallas_attention(q, k, v, **options),
        "attnjax pallas+stats": lambda q, k, v: pallas_attention(q, k, v, stats=True, **options),
        "jax xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, local_window_size=local, implementation="xla"),
        "jax cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, local_window_size=local, implementation="cudnn"),
    }
    mha = _jax_pallas_mha() if jax_mha else None
    if mha is not None and window is None and not grouped:
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


def make_inputs(tokens: int, length: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """q (B, T, Hq, D) and k, v (B, T, Hkv, D), bf16, with B * T = tokens."""
    batch = max(1, tokens // length)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:])
    return q, k, v


def visible_pairs(length: int, causal: bool, window) -> int:
    """(query, key) pairs a query attends to, summed over queries."""
    if not causal:
        return length * length
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def check_outputs(rows, tokens: int) -> None:
    """Our forward against jax.nn.dot_product_attention (xla, float32) at T = 1024."""
    from attnjax.kernels import pallas_attention

    length = min(1024, tokens)
    for heads, kv_heads, head_dim, causal, window in rows:
        q, k, v = make_inputs(min(tokens, 2 * length), length, heads, kv_heads, head_dim, seed=1)
        ours = pallas_attention(q, k, v, causal=causal, window=window).astype(jnp.float32)
        local = None if window is None else (window - 1, 0)
        with jax.default_matmul_precision("highest"):
            expected = jax.nn.dot_product_attention(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                is_causal=causal, local_window_size=local)
        error = float(jnp.max(jnp.abs(ours - expected)))
        status = "ok" if error < 3e-2 else "MISMATCH"
        print(f"# check heads {heads}/{kv_heads} head_dim={head_dim} causal={causal} window={window}: "
              f"max |ours - xla| = {error:.2e} ({status})", flush=True)
        if status != "ok":
            sys.exit("attnjax pallas output does not match jax.nn.dot_product_attention; not timing it.")


def report_auto(dtypes, head_dims) -> None:
    """Print what attention(impl="auto") resolves to for bf16 and float32 inputs, and why."""
    from attnjax import kernels
    from attnjax.kernels.pallas_attention import default_backend

    platform = jax.default_backend()
    print(f"# impl='auto' on {platform} (jax {jax.__version__}, Pallas backend '{default_backend()}'):")
    for dtype in dtypes:
        for head_dim in head_dims:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                name = kernels.resolve_impl("auto", jnp.dtype(dtype), head_dim)
                seconds = time.perf_counter() - start
            if name == "pallas":
                why = f"every Pallas kernel compiled here ({seconds:.1f} s check)"
            elif platform not in ("gpu", "cuda", "rocm", "tpu"):
                why = f"'{platform}' is not an accelerator: blockwise is the default off GPU/TPU"
            else:
                fallbacks = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
                why = "fell back: " + (fallbacks[0] if fallbacks else "no warning recorded")
            print(f"#   {dtype:8s} head_dim {head_dim:3d}: auto -> {name}; {why}", flush=True)
            deprecations = sorted({str(w.message).splitlines()[0][:160] for w in caught
                                   if issubclass(w.category, DeprecationWarning)})
            for message in deprecations:
                print(f"#     DeprecationWarning: {message}", flush=True)


def table_rows(args):
    """(heads, kv_heads, head_dim, causal, window, length) for every row, in order: the
    first head_dim's MHA rows, the GQA and window rows, then the other head_dims (so a
    --budget-s cut drops the least-asked-for rows)."""
    causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    mha = [[(args.hidden // head_dim, args.hidden // head_dim, head_dim, causal, None, length)
            for causal in causal_values for length in args.lengths] for head_dim in args.head_dims]
    decoder = []
    if not args.no_gqa:
        heads, kv_heads = GQA_HEADS
        head_dim = min(GQA_HEAD_DIM, args.hidden // heads)
        decoder = [(heads, kv_heads, head_dim, True, None, length) for length in args.lengths]
        decoder += [(heads, kv_heads, head_dim, True, window, length)
                    for window in args.window for length in args.lengths if length > window]
    return mha[0] + decoder + [row for rows in mha[1:] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--window", type=int, nargs="*", default=[4096],
                        help="sliding windows for the GQA rows (rows only where T > window)")
    parser.add_argument("--no-gqa", action="store_true", help="skip the grouped-query rows")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * T per row")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim of the MHA rows")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new row after this many seconds (rows print as they finish)")
    parser.add_argument("--auto", action="store_true", help="only report what impl='auto' picks, and why")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="input dtypes for --auto")
    parser.add_argument("--no-jax-mha", action="store_true",
                        help="omit JAX's deprecated Pallas mha column (saves its compiles)")
    parser.add_argument("--allow-cpu", action="store_true", help="run off GPU (a dry run of the script)")
    args = parser.parse_args()

    if args.auto:
        report_auto(args.dtypes, args.head_dims)
        return
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        sys.exit(f"benchmarks/kernels.py measures GPU kernels; JAX's default backend here is "
                 f"'{backend}'. Run it on a machine with an NVIDIA GPU (jax[cuda]), or pass "
                 "--allow-cpu for a dry run.")

    started = time.perf_counter()
    device = jax.devices()[0]
    print(f"# kernels: forward, bf16, batch * T = {args.tokens}, MHA heads * head_dim = {args.hidden}; "
          f"GQA rows {GQA_HEADS[0]}/{GQA_HEADS[1]} heads")
    print(f"# device: {getattr(device, 'device_kind', device)}, jax {jax.__version__}")
    if _jax_pallas_mha() is None and not args.no_jax_mha:
        print("# jax.experimental.pallas.ops.gpu.attention.mha is not available in this JAX: column omitted")
    rows = table_rows(args)
    checks = sorted({(h, kv, d, c, w if w is None or w < 1024 else 512) for h, kv, d, c, w, _ in rows},
                    key=str)
    check_outputs(checks, args.tokens)

    names = list(implementations(False, args.head_dims[0], jax_mha=not args.no_jax_mha))
    print()
    print("| head_dim | causal | window | T | batch x heads (q/kv) | " + " | ".join(names)
          + " | pallas / cudnn | stats overhead |")
    print("|" + "---|" * (7 + len(names)))
    skipped = []
    for heads, kv_heads, head_dim, causal, window, length in rows:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            skipped.append(f"d{head_dim} {heads}/{kv_heads} causal={causal} window={window} T={length}")
            continue
        fns = implementations(causal, head_dim, window, grouped=kv_heads != heads, jax_mha=not args.no_jax_mha)
        q, k, v = make_inputs(args.tokens, length, heads, kv_heads, head_dim)
        batch = q.shape[0]
        flops = 4 * batch * heads * head_dim * visible_pairs(length, causal, window)
        seconds = {}
        cells = []
        for name in names:
            if name not in fns:
                cells.append("-")
                continue
            try:
                seconds[name] = time_call(fns[name], (q, k, v), args.iters, args.repeats)
                cells.append(f"{flops / seconds[name] / 1e12:.0f}")
            except Exception as error:  # noqa: BLE001 - report and keep going
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                cells.append("OOM" if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
                             else f"error: {message[:60]}")
        plain, stats, cudnn = (seconds.get(name) for name in ("attnjax pallas", "attnjax pallas+stats", "jax cudnn"))
        cells.append(f"{cudnn / plain:.2f}" if plain and cudnn else "-")
        cells.append(f"{stats / plain - 1:+.0%}" if plain and stats else "-")
        heads_text = f"{batch}x{heads}" if kv_heads == heads else f"{batch}x{heads}/{kv_heads}"
        print(f"| {head_dim} | {causal} | {window or '-'} | {length} | {heads_text} | " + " | ".join(cells) + " |",
              flush=True)
        del q, k, v
    if skipped:
        print(f"# --budget-s {args.budget_s:g} reached; rows not run: " + "; ".join(skipped))
    print(f"# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
