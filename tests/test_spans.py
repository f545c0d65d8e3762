"""Prompt spans: span_attention and span_mass_by_step on hand-built attention, and the
span helpers on a tiny tokenizer with a chat template."""

from __future__ import annotations

import numpy as np
import pytest

import attnjax
from attnjax.analysis import ALL_HEADS, span_attention, span_mass_by_step
from attnjax.trace import Trace
from tests.tiny_decoders import tiny_decoder

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def causal_trace(layers=2, heads=3, length=9, seed=0, tokens=True) -> Trace:
    """Random causal attention rows (each sums to 1 over keys <= query)."""
    rng = np.random.default_rng(seed)
    weights = rng.random((layers, 1, heads, length, length)) * np.tril(np.ones((length, length)))
    attention = weights / weights.sum(-1, keepdims=True)  # (L, 1, H, T, T)
    return Trace(mask=np.ones((1, length), bool), input_ids=np.zeros((1, length), np.int32),
                 attention=attention.astype(np.float32), layers=tuple(range(layers)), causal=True,
                 tokens=((tuple(f"t{i}" for i in range(length)),) if tokens else None))


def test_span_attention_equals_a_direct_sum():
    """mass = mean over the query span's rows of the attention summed over the key span,
    computed here with explicit loops; the head = -1 row is the mean over heads."""
    trace = causal_trace()
    attention = np.asarray(trace.attention, np.float64)[:, 0]  # (L, H, T, T)
    spans = {"system": (0, 3), "user": (3, 7), "end": (7, 9)}
    frame = span_attention(trace, spans)
    assert list(frame.columns) == ["layer", "head", "query_span", "key_span", "mass"]
    assert len(frame) == 2 * (3 + 1) * 3 * 3
    for row in frame.itertuples():
        qa, qb = spans[row.query_span]
        ka, kb = spans[row.key_span]
        heads = range(3) if row.head == ALL_HEADS else [row.head]
        expected = np.mean([np.mean([sum(attention[row.layer, h, i, k] for k in range(ka, kb))
                                     for i in range(qa, qb)]) for h in heads])
        assert row.mass == pytest.approx(expected, abs=1e-12)
    # Causal: the system prompt's queries put nothing on later spans; every query
    # span's masses over a partition of the keys sum to 1.
    own = frame[(frame.query_span == "system") & (frame.key_span != "system")]
    assert np.allclose(own["mass"], 0.0)
    totals = frame.groupby(["layer", "head", "query_span"])["mass"].sum()
    np.testing.assert_allclose(totals, 1.0, atol=1e-6)


def test_span_attention_with_query_spans_and_errors():
    trace = causal_trace(length=6)
    frame = span_attention(trace, {"a": (0, 2), "b": (2, 6)}, queries={"last": (5, 6)})
    assert set(frame.query_span) == {"last"}
    last = np.asarray(trace.attention, np.float64)[:, 0, :, 5]  # (L, H, T)
    got = frame[(frame["head"] >= 0) & (frame.key_span == "a")].sort_values(["layer", "head"])["mass"]
    np.testing.assert_allclose(got, last[..., 0:2].sum(-1).reshape(-1), atol=1e-12)
    with pytest.raises(ValueError, match=r"spans\['user'\] = \(2, 9\) is out of range: the sequence has 6"):
        span_attention(trace, {"user": (2, 9)})
    with pytest.raises(ValueError, match=r"start < end"):
        span_attention(trace, {"user": (4, 4)})
    with pytest.raises(ValueError, match=r"queries\['q'\]"):
        span_attention(trace, {"user": (0, 2)}, queries={"q": (-1, 2)})
    with pytest.raises(ValueError, match="non-empty dict"):
        span_attention(trace, {})
    with pytest.raises(ValueError, match="token positions"):
        span_attention(trace, {"user": "hello"})
    stats_only = trace.replace(attention=None)
    with pytest.raises(ValueError, match="neither attention nor stats"):
        span_attention(stats_only, {"user": (0, 2)})


def test_span_mass_by_step_reads_the_choosing_rows():
    """Step s reads row prompt_length - 1 + s; its token is the one at the next position."""
    trace = causal_trace(length=8)
    frame = span_mass_by_step(trace, {"prompt": (0, 5)}, prompt_length=5)
    attention = np.asarray(trace.attention, np.float64)[:, 0]
    assert sorted(set(frame.step)) == [0, 1, 2]
    for row in frame[frame["head"] >= 0].itertuples():
        assert row.query == 4 + row.step and row.token == f"t{row.query + 1}"
        assert row.mass == pytest.approx(attention[row.layer, row.head, row.query, 0:5].sum(), abs=1e-12)
    with pytest.raises(ValueError, match="prompt_length=8"):
        span_mass_by_step(trace, {"prompt": (0, 5)}, prompt_length=8)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-chat")
    tiny_decoder(path, "qwen2-bias-window", max_position_embeddings=128)  # ChatML headers are many bytes
    (path / "chat_template.jinja").write_text(CHATML)
    return attnjax.load(path)


def test_spans_from_text_covers_the_marked_characters(chat_model):
    text = "The quick brown fox jumps over the lazy dog."
    spans = attnjax.spans_from_text(text, {"animal": "brown fox", "end": (35, 44)}, model=chat_model)
    ids = chat_model.tokenizer(text)["input_ids"]
    for name, piece in (("animal", "brown fox"), ("end", text[35:44])):
        start, end = spans[name]
        assert 0 <= start < end <= len(ids)
        decoded = chat_model.tokenizer.decode(ids[start:end])
        assert piece in decoded and len(decoded) < len(piece) + 8, (name, decoded)
    with pytest.raises(ValueError, match="does not occur"):
        attnjax.spans_from_text(text, {"x": "zebra"}, model=chat_model)
    with pytest.raises(ValueError, match=r"outside the text's 44 characters"):
        attnjax.spans_from_text(text, {"x": (40, 50)}, model=chat_model)


def test_spans_from_chat_names_each_role(chat_model):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "The quick brown fox?"},
                {"role": "assistant", "content": "A dog."},
                {"role": "user", "content": "The cat sat on the mat?"}]
    spans = attnjax.spans_from_chat(messages, model=chat_model)
    assert list(spans) == ["system", "user", "assistant", "user_2"]
    from attnjax.generate import prompt_ids

    ids, _ = prompt_ids(chat_model, messages)
    for name, message in zip(spans, messages):
        start, end = spans[name]
        assert chat_model.tokenizer.decode(ids[start:end]).strip() == message["content"]


def test_report_generation_sections_and_charts(chat_model, tmp_path):
    """The report's generation sections on a chat model: spans from the chat roles, the
    generation view and the span chart, written to HTML with the token text escaped."""
    from attnjax.report_generation import generation_sections
    from attnjax.viz.html import render_page

    blocks = generation_sections(chat_model, "The <b>quick</b> fox?", 3, system="Answer briefly.")
    kinds = [block.kind for block in blocks]
    assert kinds.count("chart") == 2 and "Prompt spans" in [b.content for b in blocks if b.kind == "h2"]
    note = next(b.content for b in blocks if b.kind == "note" and b.content.startswith("Spans:"))
    assert "system = tokens" in note and "user = tokens" in note
    page = render_page("generation", blocks)
    assert "<b>quick</b>" not in page  # token text never becomes markup


def test_report_generate_on_an_encoder_exits_2(capsys, tmp_path):
    from attnjax import cli

    status = cli.main(["report", "--model", "minilm", "--text", "The cat sat.", "--generate", "3",
                       "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert status == 2 and "--generate needs a decoder" in err and not (tmp_path / "r.html").exists()
    status = cli.main(["report", "--text", "The cat sat.", "--system", "Be brief.", "--out", str(tmp_path / "r.html")])
    assert status == 2 and "add --generate N" in capsys.readouterr().err
