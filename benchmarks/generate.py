"""Generation speed: attnjax.generate (KV cache, attention recorded per step) vs transformers.

Greedy decoding of NEW_TOKENS tokens after a PROMPT-token prompt of random ids, on two
random Llama models built by transformers (no download): a tiny one, and one with
SmolLM-135M's shapes (30 layers, 576 wide, 9 heads, 3 kv heads, MLP 1536, vocab
49152, tied embeddings). Both stop only at max_new_tokens (EOS is switched off), so
every path makes the same number of tokens. Prints tokens/s (new tokens over the wall
time of the whole call, prefill included; median of REPEATS calls taken in turns
after a warm-up call that compiles) for:

- attnjax with Capture(attention=True) (every row kept), with Capture(stats=True),
  and without capture;
- transformers' generate, eager attention, output_attentions=True
  (return_dict_in_generate), and without output_attentions (eager and sdpa).

Target: attnjax with capture at least as fast as transformers without it.

torch runs with --torch-threads intra-op threads (default 1): on this shared 2-core
box its default 2 threads spin against the other jobs and ran the tiny model's
generate about 8x slower (7.7 against 65 tokens/s) than with one.

    python benchmarks/generate.py [--repeats 3] [--new-tokens 64] [--torch-threads 1]

With ``--long-prompt P`` it instead measures a long prompt on the SmolLM-shaped model:
attnjax.generate of 8 new tokens after a P-token prompt (P + 8 <= 2048), with
Capture(stats=True) and without capture, each in a fresh process: wall seconds of the
first call (compilation included) and of a second one, and the process's peak RSS.
The prefill runs the streaming kernel, so its attention memory grows as O(P).

    python benchmarks/generate.py --long-prompt 2040
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from forward import interleaved_medians  # benchmarks/forward.py: one call of each path in turn

PROMPT = 32
SHAPES = {
    "tiny (2 layers, 64 wide)": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "SmolLM-135M shapes": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
}


def build(directory: Path, shape: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                                      rms_norm_eps=1e-5, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return directory


def measure(shape_name: str, shape: dict, new_tokens: int, repeats: int) -> dict:
    import numpy as np
    import torch
    import transformers

    import attnjax

    with tempfile.TemporaryDirectory() as tmp:
        directory = build(Path(tmp), shape)
        model = dataclasses.replace(attnjax.load(directory), eos_token_ids=())
        hf = {impl: transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation=impl).eval()
              for impl in ("eager", "sdpa")}
    for torch_model in hf.values():
        torch_model.generation_config.eos_token_id = None
        torch_model.generation_config.pad_token_id = 0
    prompt = np.random.default_rng(0).integers(0, shape["vocab_size"], PROMPT).astype(np.int32)
    torch_prompt = torch.tensor(prompt[None].astype(np.int64))

    def ours(capture):
        return lambda: attnjax.generate(model, prompt, max_new_tokens=new_tokens, capture=capture, progress=False)

    def theirs(impl, attentions):
        def call():
            with torch.no_grad():
                return hf[impl].generate(torch_prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False, output_attentions=attentions,
                                         return_dict_in_generate=attentions)
        return call

    paths = {
        "attnjax, Capture(attention=True)": ours(attnjax.Capture(attention=True)),
        "attnjax, Capture(stats=True)": ours(attnjax.Capture(stats=True)),
        "attnjax, no capture": ours(None),
        "transformers eager, output_attentions": theirs("eager", True),
        "transformers eager": theirs("eager", False),
        "transformers sdpa": theirs("sdpa", False),
    }
    reference = paths["attnjax, no capture"]().ids
    with torch.no_grad():
        expected = hf["eager"].generate(torch_prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False)[0].numpy()
    same = int((reference[PROMPT:] == expected[PROMPT:]).sum())
    for fn in paths.values():  # warm-up: compiles, first-call allocations
        fn()
    rates = {name: new_tokens / seconds for name, seconds in interleaved_medians(paths, repeats).items()}
    print(f"\n{shape_name}: {PROMPT}-token prompt, {new_tokens} new tokens, greedy "
          f"({same}/{new_tokens} new tokens equal transformers' eager greedy ids)")
    print(f"{'path':<42} {'tokens/s':>9}")
    for name, rate in rates.items():
        print(f"{name:<42} {rate:>9.1f}")
    return rates


LONG_NEW_TOKENS = 8


def long_prompt_once(directory: str, prompt_tokens: int, stats: bool) -> dict:
    """In this process: two generate calls after a long random prompt; seconds and peak RSS."""
    import resource
    import time

    import numpy as np

    import attnjax

    model = dataclasses.replace(attnjax.load(directory), eos_token_ids=())
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_tokens).astype(np.int32)
    capture = attnjax.Capture(stats=True) if stats else None
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        attnjax.generate(model, prompt, max_new_tokens=LONG_NEW_TOKENS, capture=capture, progress=False)
        seconds.append(time.perf_counter() - start)
    return {"first": seconds[0], "second": seconds[1], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def long_prompt(prompt_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(build(Path(tmp), SHAPES["SmolLM-135M shapes"]))
        print(f"SmolLM-135M shapes, {prompt_tokens}-token prompt, {LONG_NEW_TOKENS} new tokens; fresh process each")
        print(f"{'capture':<22} {'first call s':>12} {'second call s':>14} {'peak RSS MB':>12}")
        for stats in (True, False):
            code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import generate; "
                    f"print(json.dumps(generate.long_prompt_once({directory!r}, {prompt_tokens}, {stats})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            name = "Capture(stats=True)" if stats else "no capture"
            print(f"{name:<22} {row['first']:>12.2f} {row['second']:>14.2f} {row['peak_mb']:>12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--long-prompt", type=int, default=None, help="measure one long prompt instead")
    args = parser.parse_args()
    if args.long_prompt:
        long_prompt(args.long_prompt)
        return
    import torch

    torch.set_num_threads(args.torch_threads)
    print(f"torch intra-op threads: {torch.get_num_threads()}")
    for name, shape in SHAPES.items():
        rates = measure(name, shape, args.new_tokens, args.repeats)
        fastest_torch = max(rates["transformers eager"], rates["transformers sdpa"])
        target = rates["attnjax, Capture(attention=True)"] / fastest_torch
        print(f"attnjax with attention captured / fastest transformers without: {target:.2f}x "
              f"({'meets' if target >= 1 else 'misses'} the >= 1x target)")


if __name__ == "__main__":
    main()
