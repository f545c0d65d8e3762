"""attnjax.profile: equal to head_scores over Traces of the same texts, the same on any
mesh and across processes, resumable, lazy over its input, and honest about skips.

The model is a tiny random BERT with MiniLM's WordPiece tokenizer (2 layers, 4 heads:
compiles in seconds). The texts (tests/profile_workers.CORPUS) all fit one length
bucket, so each configuration compiles one step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import attnjax
from attnjax import Capture, analysis
from attnjax.analysis import SCORE_COLUMNS
from attnjax.analysis.scores import CHANCE_COLUMNS
from tests.profile_workers import CORPUS, assert_same

REPO = Path(__file__).resolve().parents[1]
USABLE = [i for i, text in enumerate(CORPUS) if text.strip() and text != "\U0001F600"]
# float32 rounding: per-text sums are reduced in another order than head_scores's batch sums
RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from attnjax.models.checkpoints import bundled_path
    from tests.tiny_models import tiny_bert

    directory = tmp_path_factory.mktemp("profile") / "tiny-bert"
    tiny_bert(directory, tokenizer_from=bundled_path())
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return attnjax.load(model_dir)


@pytest.fixture(scope="module")
def profiled(model):
    return attnjax.profile(model, OnlyOnce(CORPUS), batch_size=2, progress=False)


class OnlyOnce:
    """An iterable without len() that fails if anyone iterates it a second time."""

    def __init__(self, items, fail_at=None):
        self.items, self.fail_at, self.started = items, fail_at, False

    def __iter__(self):
        if self.started:
            raise AssertionError("the texts were iterated twice")
        self.started = True
        for index, item in enumerate(self.items):
            if index == self.fail_at:
                raise RuntimeError("simulated kill")
            yield item


def traces(model, capture):
    return [attnjax.run(model, CORPUS[i], capture=capture) for i in USABLE]


def test_equals_head_scores_over_traces_and_reports_skips(model, profiled):
    runs = traces(model, Capture(stats=True))
    expected = analysis.classify_heads(analysis.head_scores(runs))
    columns = list(SCORE_COLUMNS)
    # the chance baselines classify_heads raises its mass thresholds by, and its decision
    compared = columns + list(CHANCE_COLUMNS) + ["decision_score", "decision_threshold"]
    np.testing.assert_allclose(profiled[compared].to_numpy(), expected[compared].to_numpy(), rtol=RTOL, atol=ATOL)
    for column in ("layer", "head", "n_queries", "concentrated_on", "source", "category", "decided_by"):
        assert (profiled[column] == expected[column]).all(), column
    assert profiled.attrs["anomaly_parameters"] == expected.attrs["anomaly_parameters"]
    # Length-aware anomaly scores: only texts 1 (16 tokens) and 9 (14) are long enough,
    # and the scores are real numbers over those (not NaN, not diluted by short texts).
    assert np.isfinite(profiled[["concentrated", "jump"]].to_numpy()).all()
    assert profiled["n_texts"].eq(len(USABLE)).all()
    assert profiled["n_tokens"].eq(sum(int(t.mask.sum()) for t in runs)).all()
    # Stats only: the map scores are NaN, and the frame says why.
    assert profiled[["next_token", "induction", "duplicate"]].isna().all().all()
    assert set(profiled.attrs["nan_columns"]) == {"next_token", "induction", "duplicate"}
    # The spread of a head across texts is the std of head_scores of each text on its own.
    per_text = np.stack([analysis.head_scores(t)[columns].to_numpy() for t in runs])  # (N, L*H, S)
    with warnings.catch_warnings():  # all-NaN slices (map scores) warn
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanstd(per_text, axis=0)
    stds = profiled[[f"{c}_std" for c in columns]].to_numpy()
    np.testing.assert_allclose(stds, np.where(np.isnan(profiled[columns].to_numpy()), np.nan, spread),
                               rtol=1e-4, atol=1e-5)
    # Skipped: the empty text (2) and the emoji-only one (5), by index and reason.
    skipped = attnjax.skipped_texts(profiled)
    assert skipped["index"].tolist() == [2, 5]
    assert skipped["reason"].tolist() == ["empty", "only special tokens"]


def test_short_texts_leave_the_anomaly_scores_without_a_value_and_say_why(model):
    short = [CORPUS[i] for i in (0, 3, 7)]  # 9, 11 and 4 tokens: under both minimum lengths
    frame = attnjax.profile(model, short, batch_size=4, progress=False)
    expected = analysis.head_scores([attnjax.run(model, text, capture=Capture(stats=True)) for text in short])
    assert frame[["concentrated", "jump"]].isna().all().all()
    assert expected[["concentrated", "jump"]].isna().all().all()
    assert "too short" in frame.attrs["nan_columns"]["jump"] and "16 tokens" in frame.attrs["nan_columns"]["jump"]
    assert "12 tokens" in frame.attrs["nan_columns"]["concentrated"]
    assert np.isfinite(frame["entropy"]).all()


def test_attention_capture_adds_the_map_scores_for_short_buckets(model):
    frame = attnjax.profile(model, iter(CORPUS), batch_size=4, progress=False, capture=Capture(attention=True))
    expected = analysis.head_scores(traces(model, Capture(attention=True)))
    columns = list(SCORE_COLUMNS)
    np.testing.assert_allclose(frame[columns].to_numpy(), expected[columns].to_numpy(), rtol=RTOL, atol=ATOL)
    assert frame["induction"].notna().any() and frame.attrs["nan_columns"] == {}
    assert (frame["source"] == "attention").all()
    # Over the map budget the buckets record statistics with the queries and keys, and the
    # map scores are recomputed from them (analysis._qk_terms): the same numbers.
    long = attnjax.profile(model, CORPUS, batch_size=4, progress=False, capture=Capture(attention=True),
                           maps_max_length=8)
    np.testing.assert_allclose(long[columns].to_numpy(), expected[columns].to_numpy(), rtol=RTOL, atol=ATOL)
    assert long.attrs["nan_columns"] == {} and long.attrs["sources"]["stats"] > 0


def test_stats_with_queries_and_keys_give_the_map_scores_at_any_length(model):
    # Capture(stats=True, qkv=True): no T x T map at any length, and next_token, induction
    # and duplicate equal head_scores over the same texts' Traces (which recompute them
    # the same way, and equal the maps' within float32: tests/test_qk_scores.py).
    capture = Capture(stats=True, qkv=True)
    frame = attnjax.profile(model, iter(CORPUS), batch_size=4, progress=False, capture=capture)
    expected = analysis.head_scores(traces(model, capture))
    columns = list(SCORE_COLUMNS)
    np.testing.assert_allclose(frame[columns].to_numpy(), expected[columns].to_numpy(), rtol=RTOL, atol=ATOL)
    assert frame["induction"].notna().any() and frame.attrs["nan_columns"] == {}
    assert (frame["source"] == "stats").all()


def test_resume_after_a_kill_gives_the_same_frame(model, profiled, tmp_path):
    checkpoint = tmp_path / "run.npz"
    with pytest.raises(RuntimeError, match="simulated kill"):
        attnjax.profile(model, OnlyOnce(CORPUS, fail_at=9), batch_size=2, progress=False, checkpoint=checkpoint,
                        checkpoint_every=1)
    assert checkpoint.exists()
    with np.load(checkpoint, allow_pickle=False) as saved:  # numbers only, and part of the corpus
        assert 0 < saved["scalars.n_texts"] < len(USABLE)
    resumed = attnjax.profile(model, OnlyOnce(CORPUS), batch_size=2, progress=False, checkpoint=checkpoint,
                              checkpoint_every=1)
    assert_same(profiled, resumed, "resumed")
    # A finished checkpoint answers a rerun at once; another corpus or setting is refused.
    again = attnjax.profile(model, CORPUS, batch_size=2, progress=False, checkpoint=checkpoint)
    assert_same(profiled, again, "rerun")
    with pytest.raises(ValueError, match="different corpus"):
        attnjax.profile(model, ["Other words."] + CORPUS[1:], batch_size=2, progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="another model"):
        attnjax.profile(model, CORPUS, max_length=12, batch_size=2, progress=False, checkpoint=checkpoint)


def test_bad_arguments_are_named(model):
    with pytest.raises(TypeError, match=r"\[text\]"):
        attnjax.profile(model, "one text")
    with pytest.raises(ValueError, match="batch_size"):
        attnjax.profile(model, CORPUS, batch_size=0)
    with pytest.raises(ValueError, match="No usable text"):
        attnjax.profile(model, ["", "   "], progress=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sharded_and_multi_process_equal_one_device(model_dir, tmp_path):
    # One subprocess with 4 fake CPU devices checks one device == data mesh == 2x2
    # (data, model) mesh with Megatron-split params; two more run jax.distributed over
    # localhost, each keeping half the corpus. All start together (start-up dominates).
    worker = str(REPO / "tests" / "profile_workers.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    single = tmp_path / "single.csv"
    port = free_port()
    jobs = [subprocess.Popen([sys.executable, worker, "sharded", str(model_dir), str(single)],
                             env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for rank in (0, 1):
        jobs.append(subprocess.Popen([sys.executable, worker, "process", str(rank), str(port), str(model_dir),
                                      str(tmp_path / f"process{rank}.csv")],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]
    one = pd.read_csv(single)
    for rank in (0, 1):
        both = pd.read_csv(tmp_path / f"process{rank}.csv")
        floats = [c for c in one.columns if one[c].dtype.kind == "f"]
        np.testing.assert_allclose(both[floats].to_numpy(), one[floats].to_numpy(), rtol=RTOL, atol=ATOL)
        assert (both["category"] == one["category"]).all() and (both["n_texts"] == len(USABLE)).all()
        skipped = (tmp_path / f"process{rank}.csv.skipped.json").read_text()
        assert skipped == '[[2, "empty"], [5, "only special tokens"]]'


def test_sliding_window_layers_count_long_texts_by_their_window(tmp_path):
    # qwen2 with windows of 4 keys from layer 1 on: a text's span there is 4 tokens, under
    # both minimum lengths, so concentrated / jump are NaN in layers 1-2 (said per layer)
    # and real in the full-attention layer 0; the chance columns follow each layer's
    # window. All equal head_scores over the Traces.
    from tests.tiny_decoders import tiny_decoder

    tiny_decoder(tmp_path / "qwen2", "qwen2-bias-window")
    model = attnjax.load(tmp_path / "qwen2")
    texts = ["the cat sat on the mat and the dog slept by the door", "a b c"]
    frame = attnjax.profile(model, texts, batch_size=2, progress=False)
    runs = [attnjax.run(model, text, capture=Capture(stats=True)) for text in texts]
    assert int(runs[0].mask.sum()) >= 16  # long enough for both scores in layer 0
    expected = analysis.classify_heads(analysis.head_scores(runs))
    compared = list(SCORE_COLUMNS) + list(CHANCE_COLUMNS) + ["decision_score", "decision_threshold"]
    np.testing.assert_allclose(frame[compared].to_numpy(), expected[compared].to_numpy(), rtol=RTOL, atol=ATOL)
    assert (frame["category"] == expected["category"]).all()
    long = frame["layer"] == 0
    assert np.isfinite(frame.loc[long, ["concentrated", "jump"]].to_numpy()).all()
    assert frame.loc[~long, ["concentrated", "jump"]].isna().all().all()
    assert "in layers [1, 2]" in frame.attrs["nan_columns"]["jump"]
    assert "window (4 keys)" in frame.attrs["nan_columns"]["jump"]
