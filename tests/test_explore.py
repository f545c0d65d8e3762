"""attnjax.explore: the callbacks are plain methods (new text -> new chart data; layer and
head pick the right rows; bad input -> a message, not a traceback), the ipywidgets view
is wired to them, and without ipywidgets the explorer says how to install it."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

import attnjax
from attnjax.viz.common import SCALES


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


@pytest.fixture
def explorer(minilm):
    # Both texts fit the 16-token bucket: one compiled forward for the whole module.
    return attnjax.explore(minilm, "The cat sat on the mat.", layer=1, head=2, warm=False)


def rows(spec: dict, data: dict) -> list:
    """The rows of a spec's data reference (Altair moves inline data to ``datasets``)."""
    found = spec["datasets"][data["name"]] if "name" in data else data["values"]
    return json.loads(found) if isinstance(found, str) else found  # format: json (viz.common.inline_json)


def heatmap_cells(chart) -> list:
    """The (query, key, weight) cells the heatmap draws."""
    spec = chart.to_dict()
    return [(row["query"], row["key"], row["weight"]) for row in rows(spec, spec["data"])]


def test_a_new_text_gives_new_chart_data(explorer):
    before = heatmap_cells(explorer.heatmap())
    assert explorer.set_text("She went home.") is True
    after = heatmap_cells(explorer.heatmap())
    assert explorer.text == "She went home." and explorer.message == ""
    assert len(after) == explorer.num_tokens ** 2 != len(before)  # 6 tokens now, 8 before
    spec = explorer.heatmap().to_dict()
    tokens = {row["token"] for row in rows(spec, spec["transform"][0]["from"]["data"])}
    assert "home" in tokens and "cat" not in tokens
    overview = explorer.overview().to_dict()
    labels = next(p["value"] for p in overview["params"] if p["name"] == "overview_key_labels")
    assert "home" in labels.values() and "cat" not in labels.values()
    assert set(explorer.timings) == {"run", "analyses", "heatmap", "overview"}
    # the widget shows the specs built without validation; they are the validated specs
    assert explorer._specs["heatmap"] == explorer.heatmap().to_dict(validate=True)
    # The overview is written as a Vega-Lite dict (viz.overview.overview_spec). Altair's to_dict
    # (which validates it) adds only its theme's default size for views without one; the
    # overview's views all have fixed sizes, so what the widget shows draws the same.
    assert overview.pop("config") == {"view": {"continuousHeight": 300, "continuousWidth": 300}}
    assert explorer._specs["overview"] == overview


def test_layer_and_head_select_the_right_rows(explorer):
    attention = np.asarray(explorer.trace.attention[:, 0])                 # (L, H, T, T)
    n = explorer.num_tokens
    for layer, head in ((1, 2), (4, 7), (0, 11)):
        assert explorer.set_layer(layer) and explorer.set_head(head)
        cells = heatmap_cells(explorer.heatmap())
        drawn = np.zeros((n, n))
        for q, k, w in cells:
            drawn[q, k] = w
        # The spec keeps 4 significant digits (viz.common.SIGNIFICANT_DIGITS).
        np.testing.assert_allclose(drawn, attention[layer, head, :n, :n], rtol=1e-3, atol=1e-7)
        frame = explorer.head_frame()
        assert set(frame["layer"]) == {layer} and set(frame["head"]) == {head}
        assert f"layer {layer} head {head}" in str(explorer.heatmap().to_dict()["title"])


@pytest.mark.parametrize("action, argument, words", [
    ("set_text", "", "empty"),
    ("set_text", "   ", "empty"),
    ("set_text", None, "string"),
    ("set_text", "word " * 300, "256"),
    ("set_layer", 6, "0 to 5"),
    ("set_layer", -1, "0 to 5"),
    ("set_head", "2", "whole number"),
    ("set_head", 12, "0 to 11"),
    ("set_scale", "rainbow", "absolute"),
])
def test_bad_input_gives_a_message_and_keeps_the_view(explorer, action, argument, words):
    before = explorer.heatmap()
    state = (explorer.text, explorer.layer, explorer.head, explorer.scale)
    assert getattr(explorer, action)(argument) is False
    assert words in explorer.message
    assert explorer.heatmap() is before
    assert (explorer.text, explorer.layer, explorer.head, explorer.scale) == state


def test_the_scale_selector_redraws_with_that_scale(explorer):
    for scale in SCALES:
        assert explorer.set_scale(scale)
        colour = explorer.heatmap().to_dict()["encoding"]["color"]
        if scale == "absolute":
            assert colour["scale"]["domain"] == [0, 1]


def test_the_widget_is_wired_to_the_methods(explorer):
    pytest.importorskip("ipywidgets")
    box = explorer.widget()
    text, selectors, status, message = box.children[:4]
    layer, head, scale = selectors.children
    text.value = "She went home."                     # as typing and pressing Enter does
    assert explorer.text == "She went home." and "6 tokens" in status.value
    head.value = 5
    layer.value = 3
    assert (explorer.layer, explorer.head) == (3, 5) and "layer 3, head 5" in status.value
    text.value = ""
    assert "empty" in message.value and explorer.text == "She went home."
    text.value = "The cat sat."
    assert message.value == "" and explorer.text == "The cat sat."
    scale.value = "absolute"
    assert explorer.scale == "absolute"


def test_without_ipywidgets_the_explorer_names_the_install(explorer, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_widgets(name, *args, **kwargs):
        if name == "ipywidgets" or name.startswith("ipywidgets."):
            raise ImportError("No module named 'ipywidgets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_widgets)
    with pytest.raises(ImportError, match=r"pip install ipywidgets"):
        explorer.widget()
    # Displayed in a notebook without widgets: the message, then the two charts.
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objects, **_: shown.extend(objects))
    explorer._ipython_display_()
    assert "pip install ipywidgets" in capsys.readouterr().out
    assert shown == [explorer.heatmap(), explorer.overview()]


def test_a_bad_first_text_is_a_clear_error(minilm):
    with pytest.raises(ValueError, match="explore\\(text=...\\).*empty"):
        attnjax.explore(minilm, "")
    with pytest.raises(ValueError, match="no layer 9"):
        attnjax.explore(minilm, "Hello.", layer=9)


def test_the_explorers_overview_is_model_overview_of_the_trace(explorer):
    # The explorer builds the overview from the maps directly (no 1.2M-row frame); it
    # must be the very spec model_overview draws from attention_frame.
    from attnjax import viz

    explorer.set_layer(3)
    explorer.set_text("She went home.")
    expected = viz.model_overview(viz.attention_frame(explorer.trace), scores=explorer.heads, start=(3, 2))
    assert explorer.overview().to_dict() == expected.to_dict()


def test_the_overview_opens_on_the_head_the_selectors_chose(minilm):
    # explore(layer=3, head=4) and later selector changes open that head in the overview
    # too; a head change re-points the overview without rebuilding its data.
    from attnjax import viz

    explorer = attnjax.explore(minilm, "The cat sat on the mat.", layer=3, head=4, warm=False)

    def start(spec):
        return next(p["value"] for p in spec["params"] if p["name"] == "head_select")

    assert start(explorer._specs["overview"]) == [{"layer": 3, "head": 4}]
    before = explorer._specs["overview"]
    assert explorer.set_head(7) and explorer.set_layer(1)
    after = explorer._specs["overview"]
    assert start(after) == [{"layer": 1, "head": 7}] and after["datasets"] is before["datasets"]
    expected = viz.model_overview(viz.attention_frame(explorer.trace), scores=explorer.heads, start=(1, 7))
    assert explorer.overview().to_dict() == expected.to_dict()


def test_warm_up_compiles_every_bucket_so_a_new_length_compiles_nothing(minilm):
    # explore() compiles each length bucket up to 256 tokens on a background thread; after
    # it, a text in a bucket no text has used compiles nothing (JAX reports every backend
    # compilation through jax.monitoring).
    import jax

    explorer = attnjax.explore(minilm, "Short.")
    assert explorer.warming is not None
    explorer.warming.join(timeout=600)
    assert not explorer.warming.is_alive()
    assert explorer.warm_up() == [16, 32, 64, 128, 256]  # again: already compiled, quick
    compiled = []
    listener = lambda name, *_, **__: compiled.append(name) if name.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        long_text = " ".join(["attention heads route information between the tokens of a sentence"] * 15)
        assert explorer.set_text(long_text) and 128 < explorer.num_tokens <= 256
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []


def test_a_script_that_exits_during_the_warm_up_exits_cleanly():
    # The warm-up thread may be inside an XLA compilation when a script ends; exiting
    # then aborted the process ("terminate called ..."). At exit it is stopped and joined.
    import subprocess
    import sys

    code = ("import attnjax; explorer = attnjax.explore(attnjax.load('minilm'), 'The cat sat.'); "
            "print(explorer.summary())")
    for _ in range(2):  # the old abort depended on timing (about 2 runs in 3)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "terminate called" not in result.stderr and "tokens" in result.stdout
