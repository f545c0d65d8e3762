"""The induction recipe of `attnjax lab induction`, end to end on this machine.

Trains recipes.INDUCTION (2-layer attention-only Llama, width 64, 4 heads, repeated
random tokens over 64 ids at 64 positions, batch 32, AdamW 3e-3; --steps, default 2000)
for each --seeds, then classifies every head on 16 fresh repeated sequences (a random
first half, then the same half again; a seed training never uses). Prints, per seed:
wall time, the first logged step (and seconds since training started, compile
included) at which a layer-1 head is classified induction and a layer-0 head
previous-token, the final loss, the best layer-1 induction score and the best layer-0
previous-token score on the fresh sequences, and whether the issue's proof holds
(a layer-1 induction head with score >= 0.4 and a layer-0 previous-token head).

    flock /tmp/attnjax-bench.lock python benchmarks/lab.py            # the RESULTS.md table
    flock /tmp/attnjax-bench.lock python benchmarks/lab.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import os
import time

from attnjax.lab import first_step, recipes


def first_seconds(history, layer, category):
    step = first_step(history, layer, category)
    if step is None:
        return None, None
    return step, float(history.loc[history["step"] == step, "seconds"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=recipes.INDUCTION.steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| seed | steps | wall s | induction (L1) first at | previous-token (L0) first at | final loss "
          "| best L1 induction | best L0 previous-token | proof |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        started = time.perf_counter()
        result = recipes.train_induction(args.steps, seed=seed, progress=False)
        wall = time.perf_counter() - started
        heads = recipes.fresh_heads(result, recipes.induction_probe())
        history = result.history
        layer1, layer0 = heads[heads["layer"] == 1], heads[heads["layer"] == 0]
        induction = float(layer1["induction"].max())
        previous = float(layer0["previous_token"].max())
        proof = bool(((layer1["category"] == "induction") & (layer1["induction"] >= 0.4)).any()
                     and (layer0["category"] == "previous-token").any())
        cells = []
        for layer, category in ((1, "induction"), (0, "previous-token")):
            step, seconds = first_seconds(history, layer, category)
            cells.append("never" if step is None else f"step {step} ({seconds:.0f} s)")
        loss = float(history.drop_duplicates("step")["loss"].iloc[-1])
        print(f"| {seed} | {args.steps} | {wall:.0f} | {cells[0]} | {cells[1]} | {loss:.3f} | {induction:.2f} "
              f"| {previous:.2f} | {'yes' if proof else 'NO'} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
