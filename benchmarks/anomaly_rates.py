"""Anomaly detection on short and long texts: false flags on a healthy model, and
detection on broken ones.

For the bundled all-MiniLM-L6-v2 (72 heads), each text on its own
(``attnjax.run`` then ``detect_anomalies``):

- healthy texts: SHORT (2-6 word sentences), MEDIUM (one sentence of 14-20 words) and
  LONG (paragraphs of ~100-130 tokens, attnjax/data/example.txt among them). False-flag rate = flagged (head, kind) findings
  per head-text (a whole-layer finding counts once per head of that layer); also the
  share of head-texts with any flag, and of head-text verdicts withheld as "too short".
- broken models (benchmarks/RESULTS.md, "Anomaly thresholds"): every query/key kernel
  replaced by Gaussian noise, std 0.02 (near-uniform attention) and 0.3 / 1.0 (sharp
  attention on random keys); and dead heads: the healthy Trace with six heads' maps
  replaced by all attention on position 0 ([CLS]), the dead/sink head of Clark et al.
  2019. Detection rate = broken head-texts with at least one flag (for the dead heads:
  an over-concentrated flag) over all broken head-texts.
- each before (top-2 mass 0.9, a verdict at every length: the rule measured at 128
  tokens) and after (the length-aware defaults of attnjax/analysis/anomalies.py).

Then, on one paragraph cut to 4 ... 128 tokens, the per-head scores of the healthy model
by length (max over heads), and the null expectation of the jump score (a head whose
argmax is uniformly random over the keys) by length: what the minimum lengths in
attnjax/analysis/anomalies.py come from.

    python benchmarks/anomaly_rates.py
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np

SHORT = (
    "hi there", "She went home.", "The cat sat.", "Good morning everyone", "I like green tea.",
    "Where is the station?", "Thanks a lot", "It was raining again.", "Open the door please",
    "We won the game.", "Call me tomorrow.", "The soup is cold.", "He plays the piano well.",
    "My phone is broken.", "Trains run late today.", "Birds sing at dawn.", "Please close the window.",
    "This book looks interesting.", "They moved to Paris.", "Dinner is ready now.",
)
MEDIUM = (
    "The train to the coast was late again this morning, so I missed the first meeting.",
    "My grandmother grew tomatoes, beans and potatoes in the small garden behind her house.",
    "After the storm, volunteers cleared the fallen trees from the road near the school.",
    "Could you send me the report before Friday, so that we can review it together?",
    "The museum opens at nine, but the best time to visit is late in the afternoon.",
    "He had never seen the sea before, and he stood on the beach for a long time.",
    "Our team fixed the bug in the payment system and released a new version last night.",
    "Children learn to read faster when their parents read stories with them at home.",
    "The recipe asks for two eggs, a cup of sugar and some butter, mixed until smooth.",
    "Nobody expected the small local band to win the national music prize this year.",
)
LONG = (
    (Path(__file__).resolve().parents[1] / "attnjax" / "data" / "example.txt").read_text(encoding="utf-8"),
    "Scientists have long studied how birds find their way across thousands of kilometres every year. "
    "Some species use the position of the sun, others follow the stars, and many seem to sense the "
    "magnetic field of the earth itself. Young birds on their first journey often travel alone, yet they "
    "still reach places they have never seen. Researchers fit tiny trackers to the birds, follow them "
    "over oceans and deserts, and compare their routes with the weather, hoping to learn which signals "
    "matter most when the sky is covered by clouds.",
    "The town council met on Tuesday evening to discuss the new bus timetable. Several residents "
    "complained that the last bus now leaves the station before the evening shift at the hospital ends, "
    "so nurses and cleaners have to walk home in the dark. The transport manager said the change saved "
    "money, but promised to look at the numbers again. After a long debate, the council asked for a "
    "report by the end of the month and agreed to hold a public meeting in the library, where anyone "
    "could bring questions and suggestions.",
    "To bake a simple loaf of bread, mix flour, water, salt and a little yeast in a large bowl until the "
    "dough comes together. Knead it on a floured table for about ten minutes, until it feels smooth and "
    "springs back when you press it. Leave it covered in a warm place for an hour, then shape it, put it "
    "in a tin and let it rise again. Bake it in a hot oven for around forty minutes. The loaf is done "
    "when it sounds hollow as you tap the bottom, and it should cool before you cut it.",
    "When the old lighthouse keeper retired, nobody in the village wanted his job, because the tower "
    "stood on a rock that could only be reached at low tide. For a year the light was run by a machine, "
    "and for a year the fishermen grumbled that it blinked at the wrong speed. Then a young woman from "
    "the city answered an advertisement in the newspaper. She moved into the small house by the tower, "
    "repaired the lamp with her own hands, and soon the boats came home again guided by a steady beam.",
    "Learning a second language as an adult is slower than it is for children, but adults have some "
    "advantages. They can plan their study, use grammar books and dictionaries, and connect new words "
    "to ideas they already understand. Many teachers recommend a little practice every day rather than "
    "long sessions once a week. Reading simple stories, listening to the radio and speaking with "
    "patient friends all help. Most importantly, learners should not be afraid of mistakes, since every "
    "error shows what still needs work and makes the next conversation a little easier.",
)
DEAD_HEADS = ((0, 3), (1, 5), (2, 8), (3, 0), (4, 11), (5, 6))  # (layer, head) made dead


def broken_model(model, std: float, seed: int = 0):
    """The model with every query/key kernel replaced by N(0, std^2) noise."""
    rng = np.random.default_rng(seed)
    params = dict(model.params)
    encoder = dict(params["encoder"])
    for name in sorted(encoder):
        layer = copy.deepcopy({k: v for k, v in encoder[name].items()})
        attention = layer["attention"]["self"]
        for part in ("query", "key"):
            kernel = np.asarray(attention[part]["kernel"])
            attention[part] = dict(attention[part], kernel=(std * rng.standard_normal(kernel.shape)).astype(np.float32))
        encoder[name] = layer
    params["encoder"] = encoder
    return dataclasses.replace(model, params=params)


def with_dead_heads(trace, heads=DEAD_HEADS):
    """The Trace with each (layer, head) map replaced by all attention on position 0."""
    import jax.numpy as jnp

    attention = np.array(trace.attention)  # (L, B, H, T, T)
    for layer, head in heads:
        attention[layer, :, head] = 0.0
        attention[layer, :, head, :, 0] = 1.0
    return dataclasses.replace(trace, attention=jnp.asarray(attention))


def flags_per_head(frame, num_layers: int, num_heads: int, kinds=None) -> np.ndarray:
    """(L, H) count of flagged findings per head (a whole-layer row counts for every head)."""
    count = np.zeros((num_layers, num_heads))
    found = frame[frame["flagged"].astype(bool)]
    if kinds is not None:
        found = found[found["kind"].isin(kinds)]
    for layer, head in zip(found["layer"], found["head"]):
        if head < 0:
            count[layer] += 1
        else:
            count[layer, head] += 1
    return count


def too_short_count(frame) -> int:
    if "verdict" not in frame.columns:
        return 0
    return int((frame["verdict"] == "too short").sum())


# The rule before issue 10's length-aware change: top-2 mass 0.9, a verdict at any length.
BEFORE = {"concentrated_mass": 0.9, "min_tokens_dispersed": 0, "min_tokens_concentrated": 0, "min_tokens_jump": 0}


def evaluate(model, texts, *, dead: bool = False, thresholds=None):
    """(findings per head-text, share of head-texts flagged, share of verdicts too short, tokens)."""
    import attnjax
    from attnjax import analysis

    findings = flagged = judged = too_short = 0
    head_texts = 0
    lengths = []
    for text in texts:
        trace = attnjax.run(model, text, capture=attnjax.Capture(attention=True))
        lengths.append(int(np.asarray(trace.mask).sum()))
        if dead:
            trace = with_dead_heads(trace)
        frame = analysis.detect_anomalies(trace, thresholds, flagged_only=False)
        num_layers, num_heads = trace.attention.shape[0], trace.num_heads
        if dead:
            count = flags_per_head(frame, num_layers, num_heads, kinds=("over-concentrated",))
            picked = np.array([count[layer, head] for layer, head in DEAD_HEADS])
            flagged += int((picked > 0).sum())
            head_texts += len(DEAD_HEADS)
        else:
            count = flags_per_head(frame, num_layers, num_heads)
            findings += count.sum()
            flagged += int((count > 0).sum())
            head_texts += num_layers * num_heads
        judged += len(frame)
        too_short += too_short_count(frame)
    return findings / head_texts, flagged / head_texts, too_short / max(judged, 1), (min(lengths), max(lengths))


def null_jump(n: int, local_window: int = 2) -> float:
    """Expected jump score of a head whose every argmax is uniform over n keys (a BERT text
    of n tokens: [CLS] at 0, [SEP] at n - 1, no repeated tokens), every query decisive."""
    keys = np.arange(n)
    total = 0.0
    for i in range(n - 1):
        explained_a = (np.abs(keys - i) <= local_window) | (keys == 0) | (keys == n - 1)  # (n,)
        explained_b = (np.abs(keys - (i + 1)) <= local_window) | (keys == 0) | (keys == n - 1)
        counted = ~(explained_a[:, None] & explained_b[None, :])  # (k0, k1)
        step = np.abs(keys[:, None] - keys[None, :]) / n
        total += (counted * step).mean()
    return total / (n - 1)


def main() -> int:
    import attnjax
    from attnjax import analysis

    model = attnjax.load("minilm")
    print("load average:", Path("/proc/loadavg").read_text().split()[:3])
    variants = [("healthy", model, False)]
    variants += [(f"q/k noise std {std}", broken_model(model, std), False) for std in (0.02, 0.3, 1.0)]
    variants += [("dead heads (6 per text)", model, True)]
    print("\nbefore = top-2 mass 0.9 and a verdict at any length; after = the defaults.")
    print("Healthy: flags per head-text (head-texts with a flag). Broken: head-texts with a flag"
          " (detection rate). Too short: share of verdicts withheld.")
    print("\n| model | texts | tokens | before | after | after: too short |")
    print("|---|---|---|---|---|---|")
    for name, which, dead in variants:
        for label, texts in (("short", SHORT), ("medium", MEDIUM), ("long", LONG)):
            cells = []
            for thresholds in (BEFORE, None):
                findings, share, short, (low, high) = evaluate(which, texts, dead=dead, thresholds=thresholds)
                cells.append(f"{share:.3f}" if dead or name != "healthy" else f"{findings:.4f} ({share:.3f})")
            print(f"| {name} | {label} ({len(texts)}) | {low}-{high} | {cells[0]} | {cells[1]} | {short:.3f} |")
            sys.stdout.flush()

    print("\nHealthy model, one paragraph cut to n tokens: max over heads of each score;"
          " null jump = expected jump score of a random-argmax head.")
    print("\n| n | normalized entropy | concentrated share | jump | null jump |")
    print("|---|---|---|---|---|")
    text = " ".join(LONG[:2])
    for n in (3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128):
        trace = attnjax.run(model, text, max_length=n, capture=attnjax.Capture(attention=True))
        scores = analysis.head_scores(trace)
        print(f"| {n} | {scores['normalized_entropy'].max():.3f} | {scores['concentrated'].max():.2f} "
              f"| {scores['jump'].max():.3f} | {null_jump(n):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
