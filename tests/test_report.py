"""The report: every section, the size budget, and a hostile text, in headless Chromium.

One MiniLM report at 128 tokens (with a comparison) is built once for the module;
a tiny random GPT-2 (tests/tiny_models.py) covers the next-token explorer and the
long-input paths, with the budgets shrunk so that its short inputs take them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import attnjax
from attnjax import report as report_module
from attnjax.viz import browser
from attnjax.report import ReportInputError, build_report, choose_token
from tests.tiny_models import tiny_gpt2

EXAMPLE = (Path(attnjax.__file__).parent / "data" / "example.txt").read_text()
HOSTILE = "</script><script>document.title='pwned';document.body.setAttribute('data-pwned','1')</script>"
REPORT_BUDGET_BYTES = 3_000_000    # docs/viz.md: the MiniLM report at 128 tokens
OVERVIEW_BUDGET_BYTES = 2_000_000  # docs/viz.md: its overview chart's spec


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


@pytest.fixture(scope="module")
def built(minilm, tmp_path_factory):
    text = HOSTILE + " " + EXAMPLE
    report = build_report(minilm, text, compare_text=EXAMPLE, max_length=128, progress=False)
    path = report.save(tmp_path_factory.mktemp("report") / "report.html")
    return report, path, path.read_text()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(directory)
    return attnjax.load(str(directory))


def chart_specs(page: str):
    return re.findall(r'<script type="application/json" data-attnjax-chart="[^"]+">(.*?)</script>', page, re.S)


def test_report_has_every_section(built):
    report, _, page = built
    for anchor in ("run", "overview", "taxonomy", "layers", "flow", "anomalies", "comparison", "inside", "structure"):
        assert f'<h2 id="{anchor}">' in page
    assert 'id="next-token"' not in page  # BERT has no next-token head
    assert report.summary["tokens"] == 128 and report.summary["maps"] == "full"
    # overview, taxonomy, similarity, focus, flow, anomalies, comparison, text B's overview;
    # head view, steps, Q/K map, structure
    assert len(chart_specs(page)) == 12
    for stage in ("run model", "head scores", "token flow", "anomalies", "comparison", "charts"):
        assert report.timings[stage] >= 0


def test_report_size_budget_at_128_tokens(built):
    _, path, page = built
    specs = chart_specs(page)
    overview, second = specs[0], max(specs[1:], key=len)  # text A's and, in the comparison, B's (the next biggest)
    assert len(overview) <= OVERVIEW_BUDGET_BYTES, len(overview)
    assert len(second) <= OVERVIEW_BUDGET_BYTES, len(second)
    # this page compares two texts, so it holds two overviews: the budget plus one overview
    assert path.stat().st_size - len(second) <= REPORT_BUDGET_BYTES, path.stat().st_size


def test_report_escapes_the_hostile_text(built):
    _, _, page = built
    assert HOSTILE not in page
    assert "&lt;/script&gt;&lt;script&gt;document.title=" in page  # shown, escaped, in "What was run"
    assert page.lower().count("<script") == 2 + 12  # bundle, bootstrap, one JSON block per chart


def test_report_draws_in_chromium_without_running_token_text(built):
    if browser.find_chromium() is None:
        pytest.skip(f"Chromium not found: {browser.INSTALL_HINT}.")
    _, path, _ = built
    page = browser.render(path)
    assert page.charts_drawn == 12 and page.chart_errors == 0  # text B's overview draws too
    assert page.svg_count + page.canvas_count >= 12
    assert page.title == "attnjax report: minilm"
    assert 'data-pwned="1"' not in page.dom
    assert len(re.findall(r"<script\b", page.dom)) == 2 + 12


@pytest.fixture(scope="module")
def gpt2_pooled(gpt2, tmp_path_factory):
    """A GPT-2 report whose 40 tokens are over a shrunk overview budget: pooled maps."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "OVERVIEW_MAX_WEIGHTS", 2 * 4 * 20 * 20)  # full maps up to 20 tokens
        patch.setattr(report_module, "POOL_BINS", 8)
        report = build_report(gpt2, LONG_GPT2_TEXT, max_length=40, progress=False)
    path = report.save(tmp_path_factory.mktemp("gpt2") / "gpt2.html")
    return report, path, path.read_text()


LONG_GPT2_TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def test_gpt2_report_has_the_next_token_explorer(gpt2_pooled):
    report, _, page = gpt2_pooled
    assert report.summary["family"] == "gpt2"
    assert '<h2 id="next-token">' in page
    explorer = next(spec for spec in chart_specs(page) if "log_normalizers" in spec)
    assert "log_normalizers" in explorer and "temperature" in explorer


def test_long_input_switches_to_pooled_maps(gpt2_pooled):
    report, path, page = gpt2_pooled
    assert report.summary["maps"] == "pooled overview"
    assert "pooled 8 x 8" in page and "streaming statistics" in page
    if browser.find_chromium() is not None:
        rendered = browser.render(path)
        assert rendered.charts_drawn == len(chart_specs(page)) and rendered.chart_errors == 0


def test_very_long_input_keeps_statistics_only(gpt2, monkeypatch):
    monkeypatch.setattr(report_module, "OVERVIEW_MAX_WEIGHTS", 2 * 4 * 20 * 20)
    monkeypatch.setattr(report_module, "POOL_BINS", 8)
    monkeypatch.setattr(report_module, "FULL_ATTENTION_TOKENS", 30)
    report = build_report(gpt2, LONG_GPT2_TEXT, max_length=40, progress=False)
    assert report.summary["maps"] == "statistics only"
    page = attnjax.viz.to_html(report)
    assert "token flow needs them" in page and len(chart_specs(page)) == 7  # no flow chart; structure only
    assert "Left out: the input is too long for full attention maps" in page
    # Without maps the taxonomy still has the map-only scores, from the recorded q and k:
    # the taxonomy chart's rows carry a duplicate score for some head.
    rows = [row for chart in chart_specs(page) for data in json.loads(chart)["spec"].get("datasets", {}).values()
            for row in (json.loads(data) if isinstance(data, str) else data)
            if isinstance(row, dict) and "category" in row and "duplicate" in row]
    assert rows and any(row["duplicate"] is not None for row in rows)


def test_comparison_with_a_second_model(gpt2, tmp_path):
    # Two checkpoints of one architecture (seeds 0 and 1) on the same text.
    tiny_gpt2(tmp_path, seed=1)
    other = attnjax.load(str(tmp_path))
    report = build_report(gpt2, "The lazy dog sat.", model_b=other, progress=False)
    page = attnjax.viz.to_html(report)
    assert '<h2 id="comparison">' in page and f"B = {other.name}" in page
    assert "comparison" in report.timings
    assert "Same tokens in both: the maps are compared position by position" in page


def test_comparison_says_what_is_compared_and_shows_both_texts(built):
    # text A is 128 tokens, text B (the example) fewer: no position pairing, scores only
    _, _, page = built
    start = page.index('<h2 id="comparison">')
    section = page[start:page.index('<h2 id=', start + 1)]  # up to the next section (inside a head)
    assert "different lengths" in section and "only per-head summary scores" in section
    assert "change in each head&#x27;s mean entropy" in section or "change in each head's mean entropy" in section
    assert "B&#x27;s tokens" in section or "B's tokens" in section
    assert len(chart_specs(section)) == 2  # the per-head change and B's own maps


def test_a_short_text_says_which_anomalies_it_cannot_judge(minilm):
    report = build_report(minilm, "She went home.", progress=False)
    page = attnjax.viz.to_html(report)
    section = page[page.index('<h2 id="anomalies">'):]
    assert report.summary["anomalies"] == 0  # issue 10: 16 heads were flagged "dead or sink"
    assert "Not judged on this text: jumping, over-concentrated" in section
    assert "too short" in section and "needs at least 12" in section


def test_report_rejects_bad_input(minilm):
    with pytest.raises(ReportInputError, match="empty"):
        build_report(minilm, "   ")
    with pytest.raises(ReportInputError, match="512 positions"):
        build_report(minilm, "word " * 600)
    with pytest.raises(ReportInputError, match="not in the text"):
        build_report(minilm, "The cat sat.", token="zebra")


def test_choose_token():
    tokens = ("[CLS]", "the", "cat", "##s", ".", "[SEP]")
    positions = np.arange(6)
    assert choose_token(tokens, positions, None) == 3  # last word piece that is not special/punctuation
    assert choose_token(tokens, positions, "CAT") == 2
    assert choose_token(tokens, positions, 4) == 4
    with pytest.raises(ReportInputError, match="not a token position"):
        choose_token(tokens, positions, 9)


def test_run_table_describes_a_decoders_attention():
    # Gemma 2-like: grouped-query heads, sliding windows on even layers, soft-capped scores.
    from types import SimpleNamespace

    from attnjax.report import _decoder_rows

    config = SimpleNamespace(num_heads=8, num_kv_heads=4, windows=(4096, None, 4096, None),
                             attn_logit_softcapping=50.0, dtype="bfloat16")
    assert dict(_decoder_rows(config)) == {
        "kv heads": "4 (grouped-query: 2 query heads share each)",
        "sliding windows": "layers 0, 2 see the last 4096 tokens",
        "score soft-cap": "c tanh(s / c) with c = 50.0",
        "dtype": "bfloat16",
    }
    bert_like = SimpleNamespace(num_heads=12)
    assert _decoder_rows(bert_like) == []
