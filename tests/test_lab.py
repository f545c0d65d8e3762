"""attnjax.lab: training (loss, history), tasks, save / reload, transformers parity, charts, CLI.

One tiny run (2 layers, 2 heads, width 32, 40 steps) serves most tests; the full
induction recipe runs in benchmarks/lab.py (minutes, not seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import attnjax
from attnjax import analysis, cli, lab
from attnjax.lab import attention, tasks

TINY = lab.GPTConfig(layers=2, heads=2, width=32, vocab=16, context=32, mlp=False, family="llama")
STEPS = 40


@pytest.fixture(scope="module")
def tiny_run():
    return lab.train(TINY, tasks.repeated_tokens(16, 24), steps=STEPS, batch_size=16, lr=1e-2, log_every=10,
                     progress=False)


def test_history_has_loss_and_every_heads_scores(tiny_run):
    history = tiny_run.history
    assert sorted(history["step"].unique()) == [10, 20, 30, 40]
    for column in ("step", "tokens", "seconds", "loss", "layer", "head", "category", "induction", "previous_token"):
        assert column in history, column
    assert len(history) == 4 * TINY.layers * TINY.heads  # one row per logged step and head
    assert set(history["category"]) <= set(analysis.CATEGORIES)
    assert history.groupby("step")["tokens"].first().tolist() == [16 * 23 * s for s in (10, 20, 30, 40)]


def test_loss_falls(tiny_run):
    # A fresh model predicts about uniformly over 16 ids: ln 16 = 2.77 nats. The ids are
    # uniform over 1..15 (0 never occurs), so learning that alone gives ln 15 = 2.708;
    # 40 steps get there (below it needs the induction circuit: the benchmark's job).
    losses = tiny_run.history.drop_duplicates("step")["loss"].to_numpy()
    assert losses[0] > np.log(15) + 0.02        # steps 1-10 start near ln 16
    assert losses[-1] < losses[0] - 0.03
    assert abs(losses[-1] - np.log(15)) < 0.02


def test_repeated_tokens_repeat_and_shift():
    task = tasks.repeated_tokens(10, 12)
    probe = task.probe_batch(3, seed=0)
    np.testing.assert_array_equal(probe[:, :6], probe[:, 6:])  # first half, then itself
    batch = next(task.batches(64, seed=0))
    assert batch.shape == (64, 12) and batch.min() >= 1 and batch.max() <= 9
    # Training batches end in a repeated segment whose start moves between sequences.
    halves = []
    for row in batch:
        half = next(h for h in range(6, 0, -1) if np.array_equal(row[12 - 2 * h: 12 - h], row[12 - h:]))
        halves.append(half)
    assert len(set(halves)) > 1
    with pytest.raises(ValueError, match="even integer"):
        tasks.repeated_tokens(10, 11)


def test_char_text_vocabulary(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcab ba\n" * 10, encoding="utf-8")
    task = tasks.char_text(path, length=8)
    assert task.symbols == ("<unk>", "\n", " ", "a", "b", "c")
    batch = next(task.batches(4, seed=0))
    assert batch.shape == (4, 8)
    assert "".join(task.symbols[i] for i in batch[0]) in path.read_text()
    with pytest.raises(ValueError, match="no such file"):
        tasks.char_text(tmp_path / "missing.txt")


def test_bad_arguments_say_which():
    with pytest.raises(ValueError, match="width must be a multiple of heads"):
        lab.GPTConfig(layers=1, heads=3, width=32, vocab=8, context=8)
    with pytest.raises(ValueError, match="raise vocab"):
        lab.train(TINY, tasks.repeated_tokens(40, 8), steps=1, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="data ran out after 0 training batches"):
        lab.train(TINY, iter([np.ones((2, 8), np.int32)]), steps=3, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(TypeError, match="GPTConfig or a LabModel"):
        lab.train("gpt2", tasks.repeated_tokens(8, 8), steps=1, batch_size=2, lr=1e-3)


def test_saved_model_loads_in_attnjax_and_transformers_with_the_same_logits(tiny_run, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    directory = tiny_run.model.save(tmp_path / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in directory.iterdir()}
    ids = tasks.repeated_tokens(16, 24).probe_batch(2, seed=7)
    want = np.asarray(tiny_run.model.jit_forward(tiny_run.model.params, ids)[0].logits)
    loaded = attnjax.load(directory)
    np.testing.assert_array_equal(np.asarray(loaded.jit_forward(loaded.params, ids)[0].logits), want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids).long()).logits.numpy()
    # float32 on both sides; PyTorch and XLA sum in different orders: about 1e-6 apart.
    np.testing.assert_allclose(theirs, want, atol=1e-5, rtol=1e-5)
    # The character tokenizer came along: "ab" is ids 1, 2 (0 is <unk>).
    assert attnjax.tokenize(loaded, "abz?").input_ids[0].tolist()[:2] == [1, 2]


def test_gpt2_shape_round_trips_through_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    config = lab.GPTConfig(layers=1, heads=2, width=16, vocab=12, context=16, family="gpt2")
    model = lab.LabModel.wrap(lab.new_model(config, seed=3), config)
    directory = model.save(tmp_path / "gpt2")
    ids = np.arange(1, 11, dtype=np.int32)[None]  # (1, 10)
    want = np.asarray(model.jit_forward(model.params, ids)[0].logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(ids).long()).logits.numpy(), want, atol=1e-5, rtol=1e-5)


def test_custom_attention_saves_and_reloads_with_identical_logits(tmp_path):
    batches = (np.random.default_rng(step).integers(0, 16, (4, 24)) for step in range(3))  # any iterator
    result = lab.train(TINY, batches, steps=2, batch_size=4, lr=1e-2, attention_impl=attention.alibi,
                       progress=False)
    assert "induction" in result.history  # alibi returns probs: the heads are probed through it
    assert result.model.tokenizer is None  # plain ids: no vocabulary to save
    directory = result.model.save(tmp_path / "alibi")
    assert json.loads((directory / "config.json").read_text())["attnjax_attention_impl"] == \
        "attnjax.lab.attention:alibi"
    reloaded = lab.load(directory)
    assert reloaded.attention_impl is attention.alibi
    ids = tasks.repeated_tokens(16, 24).probe_batch(2, seed=3)
    trained = result.model.jit_forward(result.model.params, ids, attention_impl=result.model.impl)[0].logits
    again = reloaded.jit_forward(reloaded.params, ids, attention_impl=reloaded.impl)[0].logits
    np.testing.assert_array_equal(np.asarray(again), np.asarray(trained))
    softmax = reloaded.jit_forward(reloaded.params, ids)[0].logits  # attnjax.load's default: softmax
    assert not np.allclose(np.asarray(softmax), np.asarray(trained))


def test_an_unimportable_attention_function_must_be_passed_on_load(tmp_path):
    window = attention.sliding_window(4)
    closure = lambda q, k, v, *, mask, causal, scale: window(q, k, v, mask=mask, causal=causal, scale=scale)  # noqa: E731
    model = lab.LabModel.wrap(lab.new_model(TINY), TINY, attention_impl=closure)
    directory = model.save(tmp_path / "closure")
    with pytest.raises(ValueError, match="attention_impl=fn"):
        lab.load(directory)
    assert lab.load(directory, attention_impl=closure).attention_impl is closure
    factory = lab.LabModel.wrap(lab.new_model(TINY), TINY, attention_impl=window).save(tmp_path / "window")
    assert lab.load(factory).attention_impl.keywords == {"size": 4}  # sliding_window(4) rebuilt


def test_training_charts(tiny_run):
    from attnjax.viz import lab as charts

    spec = charts.training_charts(tiny_run.history).to_dict()
    assert len(spec["vconcat"]) == 3
    grid = charts.category_chart(tiny_run.history).to_dict()
    assert grid["params"][0]["bind"]["max"] == 3  # four logged steps: slider positions 0..3
    with pytest.raises(ValueError, match="lacks column"):
        charts.induction_chart(tiny_run.history[["step", "loss"]])


def test_lab_command_trains_saves_and_reports(tmp_path, capsys):
    out = tmp_path / "induction"
    assert cli.main(["lab", "induction", "--out", str(out), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Head categories on fresh sequences" in printed and str(out.resolve()) in printed
    assert (out / "model.safetensors").is_file() and (out / "history.csv").is_file()
    model = attnjax.load(out)
    assert model.tokenizer is not None and model.config.max_positions == 512
    assert cli.main(["lab", "text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_probe_runs_the_trained_attention_or_softmax_when_exact():
    from attnjax.lab.train import probe_impl

    assert probe_impl(attention.alibi) is attention.alibi     # returns probs: probed through itself
    assert probe_impl(attention.softmax) == "auto"            # out only, but exact: the dense softmax path
    assert probe_impl("reference") == "reference"

    def out_only(q, k, v, *, mask, causal, scale):            # neither: the history keeps the loss only
        return attention.linear(q, k, v, mask=mask, causal=causal, scale=scale)[0]

    assert probe_impl(out_only) is None


def test_lab_text_command_trains_a_character_model_end_to_end(tmp_path, capsys):
    # `attnjax lab text FILE`: a character-level model of the file, saved with its
    # character tokenizer, so `attnjax.load` reads text in that file's alphabet.
    text = tmp_path / "poem.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log.\n" * 8, encoding="utf-8")
    out = tmp_path / "text-model"
    assert cli.main(["lab", "text", str(text), "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Trained 2 steps" in printed and f"attnjax report --model {out.resolve()}" in printed
    model = attnjax.load(out)
    alphabet = sorted(set(text.read_text()))
    assert model.config.vocab_size == len(alphabet) + 1  # and <unk>
    ids = attnjax.tokenize(model, "the cat").input_ids[0].tolist()[:7]
    assert 0 not in ids and len(set(ids)) == len(set("the cat"))  # every character known, one id each
    trace = attnjax.run(model, "the dog sat.", capture=attnjax.Capture(attention=True))
    assert trace.attention.shape[:3] == (2, 1, 4)


def test_grouped_kv_heads_train_save_and_match_transformers(tmp_path):
    # GPTConfig(kv_heads=...) below heads: grouped-query attention in training (the
    # attention check runs the grouped inputs too), and the saved Llama has
    # num_key_value_heads, which transformers reads to the same logits.
    torch = pytest.importorskip("torch")
    import transformers

    config = lab.GPTConfig(layers=1, heads=4, kv_heads=2, width=32, vocab=16, context=32, mlp=False,
                           family="llama")
    result = lab.train(config, tasks.repeated_tokens(16, 24), steps=3, batch_size=8, lr=1e-2, progress=False)
    directory = result.model.save(tmp_path / "grouped")
    assert json.loads((directory / "config.json").read_text())["num_key_value_heads"] == 2
    ids = tasks.repeated_tokens(16, 24).probe_batch(2, seed=5)
    want = np.asarray(result.model.jit_forward(result.model.params, ids)[0].logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(theirs, want, atol=1e-5, rtol=1e-5)  # float32, summation order only
