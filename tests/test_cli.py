"""`attnjax report` / `attnjax profile`: exit codes and one-line messages, plus one real run.

Bad input gets one line on stderr starting "attnjax: error:", exit status 2 and no
traceback. The in-process tests call cli.main(argv); one test runs the command as
a subprocess, as `make demo` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnjax import cli

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("attnjax: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_file(capsys, tmp_path):
    status, _, err = run_main(capsys, "report", "--file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "nope.txt", "no such file")


@pytest.mark.parametrize("argv", [["--text", "   "], ["--file", "EMPTY"]])
def test_empty_text(capsys, tmp_path, argv):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    status, _, err = run_main(capsys, "report", *argv, "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "empty")


def test_unknown_model(capsys, tmp_path):
    status, _, err = run_main(capsys, "report", "--model", str(tmp_path / "no-such-model"), "--text", "hi",
                              "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--model", "no-such-model")


@pytest.mark.parametrize("where", ["missing-dir", "is-dir"])
def test_unwritable_output(capsys, tmp_path, where):
    out = tmp_path / "missing" / "r.html" if where == "missing-dir" else tmp_path
    status, _, err = run_main(capsys, "report", "--text", "hi", "--out", str(out))
    assert status == 2
    assert_one_line_error(err, "--out")
    assert not (tmp_path / "missing").exists()


def test_over_long_input_needs_max_length(capsys, tmp_path):
    status, _, err = run_main(capsys, "report", "--text", "word " * 600, "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "512 positions", "--max-length")
    assert not (tmp_path / "r.html").exists()


def test_bad_max_length_and_token(capsys, tmp_path):
    status, _, err = run_main(capsys, "report", "--text", "hi", "--max-length", "0", "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--max-length")


def test_no_command_prints_help(capsys):
    status, out, _ = run_main(capsys)
    assert status == 2 and "report" in out


def test_profile(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\nIt was warm.\n\nThe dog slept by the door.\n")
    status, out, err = run_main(capsys, "profile", str(corpus), "--csv", str(tmp_path / "heads.csv"))
    assert status == 0, err
    assert "2 paragraphs" in out and "Focus by layer" in out and "Head categories" in out
    assert (tmp_path / "heads.csv").read_text().startswith("layer,head,")
    import pandas as pd

    # induction and duplicate come from the recorded queries and keys unless --no-induction
    heads = pd.read_csv(tmp_path / "heads.csv")
    assert heads["duplicate"].notna().all() and heads["next_token"].notna().all()
    status, _, err = run_main(capsys, "profile", str(corpus), "--csv", str(tmp_path / "fast.csv"), "--no-induction")
    assert status == 0, err
    assert pd.read_csv(tmp_path / "fast.csv")["duplicate"].isna().all()
    status, _, err = run_main(capsys, "profile", str(tmp_path / "missing.txt"))
    assert status == 2
    assert_one_line_error(err, "no such file")


def test_profile_skips_an_unusable_paragraph_and_says_which(capsys, tmp_path):
    # An emoji-only paragraph becomes only [CLS] [UNK] [SEP]-like special tokens: it is
    # skipped by its number in the file, and the other paragraphs are still profiled.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\n\n\U0001F600\U0001F600\n\nThe dog slept by the door.\n")
    status, out, err = run_main(capsys, "profile", str(corpus))
    assert status == 0, err
    assert "2 paragraphs" in out and "skipped 1 unusable: paragraph 2" in out
    assert f"skipped paragraph 2 of {corpus}" in err and "Text 0" not in err


def test_profile_csv_errors_name_the_flag(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\n")
    status, _, err = run_main(capsys, "profile", str(corpus), "--csv", str(tmp_path))
    assert status == 2
    assert_one_line_error(err, "--csv", "is a directory", "heads.csv")


def test_report_command_end_to_end(tmp_path):
    # The real command in a fresh process, as `make demo` runs it (built-in example text).
    out = tmp_path / "demo.html"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "attnjax.cli", "report", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"Wrote {out.resolve()}" in result.stdout
    for stage in ("load model", "run model", "head scores", "charts", "write HTML", "total"):
        assert stage in result.stdout
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Model overview" in page


def test_bfloat16_is_for_the_decoders(capsys, tmp_path):
    # BERT and GPT-2 load in float32 only: the flag names the model and what does take it.
    status, _, err = run_main(capsys, "report", "--text", "hi there", "--dtype", "bfloat16",
                              "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--model minilm", "bfloat16", "float32 only")


def test_version(capsys):
    from attnjax import __version__

    status, out, _ = run_main(capsys, "--version")
    assert status == 0
    assert out.strip() == f"attnjax {__version__}"


def test_top_level_debug_survives_the_subcommand(capsys, tmp_path):
    # `attnjax --debug report ...` used to lose --debug to the subcommand's default.
    args = cli.build_parser().parse_args(["--debug", "report", "--text", "x"])
    assert args.debug is True
    args = cli.build_parser().parse_args(["report", "--debug", "--text", "x"])
    assert args.debug is True
    assert cli.build_parser().parse_args(["report"]).debug is False


def test_model_without_tokenizer_is_a_clear_error(capsys, tmp_path):
    from tests.tiny_models import tiny_gpt2

    tiny_gpt2(tmp_path / "no-tokenizer", with_tokenizer=False)
    capsys.readouterr()  # save_pretrained's progress bar
    status, _, err = run_main(capsys, "report", "--model", str(tmp_path / "no-tokenizer"),
                              "--text", "hello", "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "has no tokenizer", "tokenizer.json", "model.forward(model.params, input_ids)")


def test_negative_token_counts_from_the_end():
    from attnjax.report import ReportInputError, choose_token

    tokens = ("[CLS]", "the", "cat", "[SEP]")
    positions = np.arange(4)
    assert choose_token(tokens, positions, -1) == 3
    assert choose_token(tokens, positions, -4) == 0
    with pytest.raises(ReportInputError, match="-1..-4 from the end"):
        choose_token(tokens, positions, -5)


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    # `attnjax report ... | head`: printing into the closed pipe raises BrokenPipeError;
    # the command stops quietly with 128 + SIGPIPE instead of a traceback.
    def reader_went_away(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "run_report", reader_went_away)
    status, _, err = run_main(capsys, "report", "--text", "x")
    assert status == cli.EXIT_BROKEN_PIPE == 141
    assert err == ""


def test_model_b_of_another_shape_is_refused_before_running(capsys, tmp_path):
    # MiniLM is 6 layers x 12 heads; a 2-layer x 4-head BERT cannot be compared head by head.
    from attnjax.models.checkpoints import bundled_path
    from tests.tiny_models import tiny_bert

    tiny_bert(tmp_path / "small-bert", tokenizer_from=bundled_path())
    capsys.readouterr()
    status, _, err = run_main(capsys, "report", "--text", "hi there", "--model-b", str(tmp_path / "small-bert"),
                              "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--model-b", "2 layers x 4 heads", "6 x 12", "same architecture")
    report = tmp_path / "r.html"
    assert not report.exists() or report.stat().st_size == 0  # nothing was run or written


# ------------------------------------------------------------- sentence pairs (--pair)


def test_pair_report_shows_the_segments(capsys, tmp_path):
    out = tmp_path / "pair.html"
    status, stdout, err = run_main(capsys, "report", "--text", "Where is it?", "--pair", "Two streets north.",
                                   "--out", str(out))
    assert status == 0, err
    assert "on 11 tokens" in stdout  # [CLS] where is it ? [SEP] two streets north . [SEP]
    page = out.read_text()
    assert "Two streets north." in page
    # BERT gives the first [SEP] segment 0 and the closing one segment 1
    assert "A (segment 0): positions 0-5, B (segment 1): positions 6-10; [SEP] at 5, 10" in page


def test_pair_on_a_decoder_or_with_compare_is_refused(capsys, tmp_path):
    from tests.tiny_models import tiny_gpt2

    tiny_gpt2(tmp_path / "gpt2")
    capsys.readouterr()
    status, _, err = run_main(capsys, "report", "--model", str(tmp_path / "gpt2"), "--text", "hello",
                              "--pair", "world", "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--pair", "BERT sentence pair", "gpt2 decoder", "put both sentences in --text")
    status, _, err = run_main(capsys, "report", "--text", "a", "--pair", "b", "--compare", "c",
                              "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--pair and --compare cannot be combined")
    status, _, err = run_main(capsys, "report", "--text", "a", "--pair", "  ", "--out", str(tmp_path / "r.html"))
    assert status == 2
    assert_one_line_error(err, "--pair is empty")


def test_pair_segment_ids_match_hugging_face():
    # attnjax.run(model, [(a, b)]) tokenises with the tokenizers library's pair encoding;
    # transformers' own tokenizer is the reference (tests may import it).
    transformers = pytest.importorskip("transformers")
    import attnjax
    from attnjax.models.checkpoints import bundled_path

    model = attnjax.load("minilm")
    pairs = [("Where is it?", "Two streets north."), ("She went home.", "He stayed at the office until late.")]
    batch = attnjax.tokenize(model, pairs)
    reference = transformers.AutoTokenizer.from_pretrained(str(bundled_path()))
    for row, (a, b) in enumerate(pairs):
        expected = reference(a, b)
        n = len(expected["input_ids"])
        assert batch.attention_mask[row].sum() == n
        np.testing.assert_array_equal(batch.input_ids[row, :n], expected["input_ids"])
        np.testing.assert_array_equal(batch.token_type_ids[row, :n], expected["token_type_ids"])
    trace = attnjax.run(model, pairs)
    assert trace.tokens[0][:11] == ("[CLS]", "where", "is", "it", "?", "[SEP]", "two", "streets", "north", ".", "[SEP]")
def test_profile_parquet_in_parquet_and_html_out(capsys, tmp_path):
    # A Parquet corpus with a None row (skipped, named by its row number), per-head scores
    # written as Parquet, and the corpus page; the checkpoint is gone once it finished.
    import pandas as pd

    corpus = tmp_path / "corpus.parquet"
    pd.DataFrame({"body": ["The cat sat on the mat.", None, "The dog slept by the door."]}).to_parquet(corpus)
    out, page = tmp_path / "heads.parquet", tmp_path / "corpus.html"
    status, out_text, err = run_main(capsys, "profile", str(corpus), "--column", "body", "--out", str(out),
                                     "--html", str(page), "--batch-size", "4", "--no-progress")
    assert status == 0, err
    assert "2 rows" in out_text and "skipped 1 unusable: row 2" in out_text
    assert f"skipped row 2 of {corpus}: not a string" in err
    heads = pd.read_parquet(out)
    assert len(heads) == 72 and {"category", "n_texts", "entropy_std"} <= set(heads.columns)
    html = page.read_text()
    for section in ("Head taxonomy and stability", "Head scores across texts", "Focus by layer",
                    "Anomalies over the corpus", "What was skipped", "not a string"):
        assert section in html
    # Both texts are under the anomaly scores' minimum lengths (12 / 16 tokens,
    # attnjax.analysis.anomalies): the page says why concentrated and jump have no value.
    assert "jump is NaN: too short" in html and "concentrated is NaN: too short" in html
    assert "(texts of \\u003e= 16 tokens)" in html  # the jump chart's subtitle ('>' escaped in its JSON)
    assert not list(tmp_path.glob("*.checkpoint.npz"))
    from attnjax.viz import browser

    if browser.find_chromium():  # every chart of the page draws, offline, without errors
        rendered = browser.render(page)
        assert rendered.drew and rendered.charts_drawn == 5, (rendered.charts_drawn, rendered.chart_errors)


@pytest.mark.parametrize("case", ["missing", "column-csv", "column-jsonl", "not-parquet", "unwritable", "format"])
def test_profile_bad_input_is_one_line(capsys, tmp_path, case):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("title,body\nA,The cat sat.\n")
    argv = ["profile", str(corpus), "--column", "body"]
    expected = ()
    if case == "missing":
        argv[1], expected = str(tmp_path / "nope.jsonl"), ("nope.jsonl", "no such file")
    elif case == "column-csv":
        argv[3], expected = "text", ("no column 'text'", "--column")
    elif case == "column-jsonl":
        jsonl = tmp_path / "corpus.jsonl"
        jsonl.write_text('{"body": "The cat sat."}\n')
        argv[1:], expected = [str(jsonl)], ("no field 'text'", "--column")
    elif case == "not-parquet":
        bad = tmp_path / "corpus.parquet"
        bad.write_text("not parquet")
        argv[1], expected = str(bad), ("cannot be read as Parquet",)
    elif case == "unwritable":
        argv += ["--out", str(tmp_path / "missing" / "heads.csv")]
        expected = ("--out", "does not exist")
    else:
        argv += ["--format", "jsonl"]
        expected = ("not JSON",)
    status, _, err = run_main(capsys, *argv)
    assert status == 2
    assert_one_line_error(err, *expected)


def test_corpus_readers_stream_records(tmp_path):
    from attnjax.readers import read_corpus

    text = tmp_path / "c.txt"
    text.write_bytes(b"One line.\nSame paragraph.\n\n\n\xff\xfe bad bytes\n\nLast.")
    assert [t if t is None or t.isprintable() else "<bad>" for t in read_corpus(text, "txt")] == [
        "One line. Same paragraph.", "<bad>", "Last."]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a"}\nnot json\n\n{"other": 1}\n["list"]\n')
    assert list(read_corpus(jsonl, "jsonl")) == ["a", None, None, None]
