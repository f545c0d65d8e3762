"""Exported charts open in headless Chromium, offline, draw, and run no script from token text.

Chromium (Debian's `chromium` package) runs with --headless --no-sandbox, a fresh
profile and every host name unresolvable; the page must still draw, so nothing it
needs comes from the network. Without Chromium these tests skip and say how to
install it (.ci/run installs it, so CI always runs them).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import attnjax
from attnjax import analysis, viz
from attnjax.viz import browser
from attnjax.viz.html import to_html

HOSTILE = [
    "</script><script>document.title='pwned';document.body.setAttribute('data-pwned','1')</script>",
    "<img src=x onerror=\"document.title='pwned-img'\">",
    "\u2028<!--",
]


@pytest.fixture(scope="module")
def chromium():
    found = browser.find_chromium()
    if found is None:
        pytest.skip(f"Chromium not found: {browser.INSTALL_HINT}.")
    return found


@pytest.fixture(scope="module")
def trace():
    return attnjax.run(attnjax.load("minilm"), "The cat sat on the mat. Then the cat saw a dog.")


def charts(trace):
    frame = viz.attention_frame(trace)
    heads = analysis.classify_heads(analysis.head_scores(trace))
    anomalies = analysis.detect_anomalies(trace)
    other = attnjax.run(attnjax.load("minilm"), "The dog sat on the mat. Then the dog saw a cat.")
    logits = np.linspace(3.0, -3.0, 50)
    return {
        "heatmap": viz.attention_heatmap(frame, layer=1, head=4, scale="log"),
        "overview": viz.model_overview(frame, scores=heads),
        "taxonomy": viz.taxonomy_chart(heads),
        "similarity": viz.layer_similarity_chart(analysis.layer_similarity(trace)),
        "focus": viz.focus_chart(analysis.focus_by_layer(trace)),
        "token_flow": viz.token_flow_chart(analysis.token_flow(trace, 2), analysis.rollout_frame(trace, sequence=0),
                                           heads=True),
        "anomalies": viz.anomaly_chart(anomalies, heads),
        "comparison": viz.comparison_chart(analysis.compare(trace, other)),
        "next_token": viz.next_token_explorer(*viz.next_token_frames(logits, lambda i: f" t{i}", k=5)),
    }


def test_every_chart_draws_offline(chromium, trace, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    paths = {name: viz.save_html(chart, tmp_path / f"{name}.html") for name, chart in charts(trace).items()}
    with ThreadPoolExecutor(max_workers=3) as pool:  # one Chromium per page, a few at a time
        pages = dict(zip(paths, pool.map(lambda path: browser.render(path, chromium=chromium), paths.values())))
    failures = [(name, page.charts_drawn, page.chart_errors, page.svg_count, page.canvas_count)
                for name, page in pages.items() if not page.drew]
    assert not failures, f"charts that did not draw (name, drawn, errors, svg, canvas): {failures}"


def test_the_first_token_keeps_its_labels(chromium, tmp_path):
    # With Vega's plain labelBound the first token's labels were hidden once cells are
    # narrow (here 114 tokens: 3-4 px): the tilted key label starts left of the axis and
    # the 9 px query label is taller than its cell, so [CLS] (often the most attended key)
    # went unnamed on the heatmap and the overview's large view. It must be drawn on both
    # axes (Vega hides a label with opacity 0).
    frame = viz.attention_frame(attnjax.run(attnjax.load("minilm"), "The cat sat on the mat. " * 16))
    for name, chart in (("heatmap", viz.attention_heatmap(frame, layer=0, head=0)),
                        ("overview", viz.model_overview(frame))):
        path = tmp_path / f"{name}.html"
        path.write_text(to_html(chart, renderer="svg"))
        page = browser.render(path, chromium=chromium)
        assert page.drew
        shown = re.findall(r'<text[^>]*opacity="1"[^>]*>\[CLS\]</text>', page.dom)
        assert len(shown) == 2, name  # the query axis and the key axis


def hostile_frame(n: int = 6) -> pd.DataFrame:
    tokens = ["[CLS]"] + HOSTILE + ["fine"] * (n - 1 - len(HOSTILE))
    index = np.arange(n)
    weights = np.random.default_rng(0).dirichlet(np.ones(n), size=(2, 2, n))  # (L, H, Q, K)
    return pd.DataFrame({
        "layer": np.repeat([0, 1], 2 * n * n), "head": np.tile(np.repeat([0, 1], n * n), 2),
        "query": np.tile(np.repeat(index, n), 4), "key": np.tile(index, 4 * n), "weight": weights.reshape(-1),
        "query_token": np.tile(np.repeat(tokens, n), 4), "key_token": np.tile(np.tile(tokens, n), 4),
    })


@pytest.mark.parametrize("renderer", ["svg", "canvas"])
def test_hostile_tokens_render_as_text(chromium, tmp_path, renderer):
    frame = hostile_frame()
    path = tmp_path / "hostile.html"
    path.write_text(to_html(viz.model_overview(frame), title="hostile test", renderer=renderer))
    page = browser.render(path, chromium=chromium)
    assert page.drew
    assert page.title == "hostile test"  # no injected script changed it
    assert 'data-pwned="1"' not in page.dom
    assert not re.search(r"<img[^>]*onerror", page.dom)
    assert len(re.findall(r"<script\b", page.dom)) == 3  # bundle, spec JSON, bootstrap: nothing else
    if renderer == "svg":  # the axis labels are the (truncated) tokens, as text
        assert re.search(r"<text[^>]*>&lt;/script&gt;&lt;s\u2026</text>", page.dom)
        assert re.search(r"<text[^>]*>&lt;img src=x \u2026</text>", page.dom)


def test_control_altair_own_html_runs_the_injected_script(chromium, tmp_path):
    # Why the exporter exists: Altair's HTML pastes the spec into a script element, and
    # the hostile token runs there. This also shows the checks above can see an injection.
    import altair as alt

    chart = alt.Chart(pd.DataFrame({"token": [HOSTILE[0]], "weight": [1.0]})).mark_bar().encode(x="token:N",
                                                                                               y="weight:Q")
    path = tmp_path / "altair.html"
    path.write_text(chart.to_html())
    assert browser.render(path, chromium=chromium).title == "pwned"


def with_probe(page: str, probe_js: str) -> str:
    """The page with its CSP removed and ``probe_js`` run 2 s after the charts are embedded.

    The probe sees the Vega views in ``views``; it reports through document.title."""
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    probe = """<script>
    var realEmbed = window.vegaEmbed, views = [];
    window.vegaEmbed = function (el, spec, opts) {
      return realEmbed(el, spec, opts).then(function (r) { views.push(r.view); return r; }); };
    function findItems(node, test, out) { (node.items || []).forEach(function (item) {
      if (item.datum && item.mark && test(item)) out.push(item); findItems(item, test, out); }); return out; }
    function pointAt(view, item) {
      var b = item.bounds, x = (b.x1 + b.x2) / 2, y = (b.y1 + b.y2) / 2, group = item.mark.group;
      while (group) { x += group.x || 0; y += group.y || 0; group = group.mark && group.mark.group; }
      var canvas = view.container().querySelector('canvas'), box = canvas.getBoundingClientRect();
      return {canvas: canvas, x: box.left + x + view.origin()[0], y: box.top + y + view.origin()[1]}; }
    function fire(point, types) { types.forEach(function (t) {
      point.canvas.dispatchEvent(new MouseEvent(t, {bubbles: true, clientX: point.x, clientY: point.y})); }); }
    setTimeout(function () { try { PROBE } catch (e) { document.title = 'probe failed: ' + e; } }, 2000);
    </script>""".replace("PROBE", probe_js)
    return page.replace("<script>(function () {", probe + "<script>(function () {", 1)


def test_clicking_a_thumbnail_opens_that_head(chromium, trace, tmp_path):
    page = to_html(viz.model_overview(viz.attention_frame(trace)), renderer="canvas")
    probe = """
      var view = views[0];
      var cell = findItems(view.scenegraph().root, function (item) {
        return item.datum.layer === 3 && item.datum.head === 5 && item.mark.marktype === 'rect'; }, [])[0];
      fire(pointAt(view, cell), ['pointermove', 'mousemove', 'pointerdown', 'mousedown', 'pointerup', 'mouseup',
                                 'click']);
      setTimeout(function () { document.title = 'selected ' + view.signal('head_select_layer') + ' '
                                                + view.signal('head_select_head'); }, 500);"""
    path = tmp_path / "click.html"
    path.write_text(with_probe(page, probe))
    assert browser.render(path, chromium=chromium).title == "selected 3 5"


def test_tooltips_show_hostile_tokens_as_text(chromium, tmp_path):
    # The probe spells the token's "<" as \u003c so that its own script element stays open.
    page = to_html(viz.attention_heatmap(hostile_frame(), layer=0, head=0), renderer="canvas")
    probe = """
      var view = views[0];
      var cell = findItems(view.scenegraph().root, function (item) {
        return item.datum.query === 1 && item.datum.key === 2 && item.mark.marktype === 'rect'; }, [])[0];
      fire(pointAt(view, cell), ['pointermove', 'mousemove', 'pointerover']);
      setTimeout(function () {
        var tip = document.getElementById('vg-tooltip-element') || document.createElement('div');
        var shown = tip.textContent.indexOf('\\u003c/script>\\u003cscript>') >= 0;
        document.title = 'tooltip ' + (tip.querySelector('img, script') ? 'has markup' : 'text only') + ' '
                         + (shown ? 'shows token' : 'no token'); }, 500);"""
    path = tmp_path / "tooltip.html"
    path.write_text(with_probe(page, probe))
    assert browser.render(path, chromium=chromium).title == "tooltip text only shows token"


def test_temperature_slider_recomputes_the_softmax_in_the_page(chromium, tmp_path):
    logits = np.linspace(3.0, -3.0, 50)
    top, normalizers = viz.next_token_frames(logits, lambda i: f" t{i}", k=5)
    hottest = float(normalizers["temperature"].iloc[-1])
    page = to_html(viz.next_token_explorer(top, normalizers), renderer="canvas")
    probe = """
      function firstBar() {
        return findItems(views[0].scenegraph().root, function (item) {
          return item.datum.rank === 1 && item.datum.probability !== undefined; }, [])[0].datum.probability; }
      var before = firstBar();
      var slider = document.querySelector('input[type=range]');
      slider.value = slider.max;
      slider.dispatchEvent(new Event('input', {bubbles: true}));
      setTimeout(function () {
        document.title = 'p ' + before.toFixed(5) + ' ' + firstBar().toFixed(5) + ' t ' + slider.value; }, 500);"""
    path = tmp_path / "slider.html"
    path.write_text(with_probe(page, probe))
    title = browser.render(path, chromium=chromium).title
    match = re.fullmatch(r"p ([0-9.]+) ([0-9.]+) t ([0-9.]+)", title)
    assert match, title
    before, after, shown_temperature = map(float, match.groups())

    def softmax_top(t):
        z = logits / t
        return float(np.exp(z[0] - z.max()) / np.exp(z - z.max()).sum())

    start = float(alt_default_temperature(normalizers))
    assert shown_temperature == pytest.approx(hottest)
    assert before == pytest.approx(softmax_top(start), abs=1e-5)
    assert after == pytest.approx(softmax_top(hottest), abs=1e-5)
    assert after < before  # a hotter softmax flattens the distribution


def alt_default_temperature(normalizers):
    """The slider's starting value as next_token_explorer picks it: 1.0, clamped to the grid."""
    temps = normalizers["temperature"].to_numpy()
    return min(max(1.0, temps[0]), temps[-1])


@pytest.fixture(scope="module")
def qkv_trace():
    return attnjax.run(attnjax.load("minilm"), "The cat sat on the mat. Then the cat saw a dog.",
                       capture=attnjax.Capture(attention=True, qkv=True))


def test_inside_a_head_views_draw_offline(chromium, qkv_trace, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    views = {"head_view": viz.head_view(qkv_trace), "steps": viz.attention_steps(qkv_trace, 2, 3, 5),
             "qk": viz.qk_embedding(qkv_trace, 2), "structure": viz.model_structure(attnjax.load("minilm"))}
    paths = {name: viz.save_html(chart, tmp_path / f"{name}.html") for name, chart in views.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        pages = dict(zip(paths, pool.map(lambda path: browser.render(path, chromium=chromium), paths.values())))
    failures = [(name, page.charts_drawn, page.chart_errors) for name, page in pages.items() if not page.drew]
    assert not failures, f"views that did not draw (name, drawn, errors): {failures}"


def test_pointing_at_a_token_keeps_only_its_lines(chromium, qkv_trace, tmp_path):
    # Layer 0, every head overlaid: before the hover every line of the layer is drawn;
    # pointing at query token 3 (the left column, right-aligned text) leaves its lines only.
    n = int(np.asarray(qkv_trace.mask[0]).sum())
    page = to_html(viz.head_view(qkv_trace, layer=0), renderer="canvas")
    probe = """
      var view = views[0];
      function rules() { return findItems(view.scenegraph().root, function (item) {
        return item.mark.marktype === 'rule' && item.datum.weight !== undefined; }, []); }
      var before = rules().length;
      var token = findItems(view.scenegraph().root, function (item) {
        return item.mark.marktype === 'text' && item.align === 'right' && item.datum.query === 3; }, [])[0];
      fire(pointAt(view, token), ['pointermove', 'mousemove', 'pointerover', 'mouseover']);
      setTimeout(function () {
        var after = rules(), own = after.filter(function (item) { return item.datum.query === 3; });
        document.title = 'lines ' + before + ' ' + after.length + ' ' + own.length; }, 500);"""
    path = tmp_path / "hover.html"
    path.write_text(with_probe(page, probe))
    title = browser.render(path, chromium=chromium).title
    assert title == f"lines {12 * n * n} {12 * n} {12 * n}", title  # 12 heads x n keys, all from query 3


def test_inside_views_show_hostile_tokens_as_text(chromium, qkv_trace, tmp_path):
    n = qkv_trace.seq_len
    tokens = (["[CLS]"] + HOSTILE + ["bidi \u202eevil"] + ["fine"] * n)[:n]
    hostile = qkv_trace.with_tokens([tokens])
    for name, chart in {"head_view": viz.head_view(hostile, layer=0), "steps": viz.attention_steps(hostile, 0, 0, 1),
                        "qk": viz.qk_embedding(hostile, 0, 0)}.items():
        path = tmp_path / f"{name}.html"
        path.write_text(to_html(chart, title="hostile test"))
        page = browser.render(path, chromium=chromium)
        assert page.drew and page.title == "hostile test", name
        assert 'data-pwned="1"' not in page.dom and not re.search(r"<img[^>]*onerror", page.dom), name
        assert len(re.findall(r"<script\b", page.dom)) == 3, name
        assert "\u202e" not in page.dom and "\u27e8U+202" in page.dom, name  # bidi override shown (as a tag, maybe cut), not applied


def test_structure_tree_folds_with_its_parameters(chromium, tmp_path):
    from attnjax.viz.structure import structure_frames

    model = attnjax.load("minilm")
    rows, _, _ = structure_frames(model)
    shown = rows[(rows.depth <= 3) & ((rows.block < 0) | rows.opens_block | (rows.block == 2))]
    page = to_html(viz.model_structure(model), renderer="canvas")
    probe = """
      var view = views[0];
      function modules() { var seen = {}; findItems(view.scenegraph().root, function (item) {
        return item.mark.marktype === 'text' && item.datum.module !== undefined; }, []).forEach(function (item) {
        seen[item.datum.module] = true; }); return Object.keys(seen).length; }
      view.signal('structure_depth', 1).runAsync().then(function () {
        var top = modules();
        view.signal('structure_depth', 3).signal('structure_block', 2).runAsync().then(function () {
          document.title = 'rows ' + top + ' ' + modules(); }); });"""
    path = tmp_path / "structure.html"
    path.write_text(with_probe(page, probe))
    assert browser.render(path, chromium=chromium).title == f"rows 4 {len(shown)}"  # root, embeddings, encoder, pooler
