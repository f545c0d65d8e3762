"""Chart builders, encodings and export on small real Traces (no browser needed).

Every builder's output must (a) validate against the Vega-Lite schema (Altair
validates in to_dict), (b) encode the fields it promises, and (c) carry the
number of cells the input implies. Encodings (weight codes, PNG thumbnails,
script-safe JSON) are checked against their definitions.
"""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pandas as pd
import pytest

import attnjax
from attnjax import analysis, viz
from attnjax.viz import codes, images
from attnjax.viz.html import chart_spec, script_json, to_html

TEXT = "The cat sat on the mat. Then the cat saw a dog."
HOSTILE = "</script><script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def minilm():
    return attnjax.load("minilm")


@pytest.fixture(scope="module")
def trace(minilm):
    return attnjax.run(minilm, TEXT)


@pytest.fixture(scope="module")
def frame(trace):
    return viz.attention_frame(trace)


@pytest.fixture(scope="module")
def heads(trace):
    return analysis.classify_heads(analysis.head_scores(trace))


def n_tokens(trace) -> int:
    return int(np.asarray(trace.mask[0]).sum())


def datasets(spec: dict) -> dict:
    """Top-level named datasets of a spec (Altair consolidates inline data there)."""
    return {name: json.loads(rows) if isinstance(rows, str) else rows  # format: json (viz.common.inline_json)
            for name, rows in spec.get("datasets", {}).items()}


def units(spec: dict, data=None):
    """Every unit (single-view) spec inside a composed spec, with the data it inherits."""
    data = spec.get("data", data)
    if "mark" in spec:
        yield {**spec, "data": data} if data is not None else spec
    for key in ("layer", "hconcat", "vconcat", "concat"):
        for child in spec.get(key, []):
            yield from units(child, data)


def fields(spec: dict) -> set:
    found = set()
    for unit in units(spec):
        for channel in unit.get("encoding", {}).values():
            items = channel if isinstance(channel, list) else [channel]
            for item in items:
                if isinstance(item, dict) and "field" in item:
                    found.add(item["field"])
    return found


def rows_of(spec: dict, unit: dict) -> list:
    name = unit.get("data", {}).get("name")
    rows = datasets(spec)[name] if name else unit["data"]["values"]
    return json.loads(rows) if isinstance(rows, str) else rows


# --- weight codes ---------------------------------------------------------------------

def test_code_alphabet_needs_no_escaping():
    # 90 printable ASCII characters without the five that JSON or HTML would escape.
    assert codes.LEVELS == 90
    assert not set('"\\<>&') & set(codes.ALPHABET)
    assert json.dumps(codes.ALPHABET)[1:-1] == codes.ALPHABET


def test_codes_round_trip_within_stated_error():
    weights = np.concatenate([np.geomspace(codes.FLOOR, 1.0, 500), [0.0, 1e-6, 5e-5]])
    decoded = codes.decode(codes.encode(weights))
    kept = weights >= codes.FLOOR
    relative = np.abs(decoded[kept] - weights[kept]) / weights[kept]
    assert relative.max() <= codes.RELATIVE_ERROR + 1e-12  # half a log step: 10**(4/88/2) - 1 = 5.4 %
    assert np.all(decoded[~kept] == 0.0)
    assert len(codes.encode(np.zeros((7, 5)))) == 35  # one character per weight


def test_vega_decodes_codes_as_python_does():
    # Evaluate the Vega expression in Vega itself (vl-convert) for all 90 codes.
    import vl_convert

    rows = [{"i": i, "c": codes.ALPHABET[i]} for i in range(codes.LEVELS)]
    spec = {
        "data": {"values": rows},
        "transform": [{"calculate": codes.vega_decode("datum.c"), "as": "w"},
                      {"calculate": "format(datum.w, '.6e')", "as": "text"}],
        "mark": "text",
        "encoding": {"y": {"field": "i", "type": "ordinal"}, "text": {"field": "text"}},
    }
    svg = vl_convert.vegalite_to_svg(spec)
    shown = [float(t) for t in re.findall(r">([0-9.]+e[+-]\d+)<", svg)]
    expected = codes.decode(codes.ALPHABET)
    assert len(shown) == codes.LEVELS
    np.testing.assert_allclose(sorted(shown), sorted(expected), rtol=1e-5)


# --- thumbnails -----------------------------------------------------------------------

def test_palette_matches_vega_end_points():
    viridis = images.palette("viridis")
    assert viridis.shape == (256, 3)
    assert viridis[0].tolist() == [0x44, 0x01, 0x54] and viridis[-1].tolist() == [0xFD, 0xE7, 0x25]
    with pytest.raises(ValueError, match="Unknown colour scheme"):
        images.palette("jet")


def test_png_is_valid_indexed_image():
    levels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    png = images.png_indexed(levels, images.palette("magma"))
    assert png[:8] == images.PNG_SIGNATURE
    width, height, depth, colour_type = struct.unpack(">IIBB", png[16:26])
    assert (width, height, depth, colour_type) == (4, 3, 8, 3)  # 8-bit palette
    start = png.index(b"IDAT") + 4
    length = struct.unpack(">I", png[start - 8:start - 4])[0]
    raw = zlib.decompress(png[start:start + length])
    assert raw == b"".join(b"\x00" + row.tobytes() for row in levels)


def test_pooling_uses_the_stats_binning():
    # 5 positions into 2 bins: floor(t * 2 / 5) -> bins {0, 1, 2} and {3, 4}.
    attention = np.arange(25, dtype=np.float64).reshape(5, 5)
    pooled = images.pool_map(attention, 2)
    assert pooled[0, 0] == pytest.approx(attention[:3, :3].mean())
    assert pooled[1, 1] == pytest.approx(attention[3:, 3:].mean())


def test_quantile_levels_ignore_a_dominant_column():
    # One huge column would make every other cell level 0 on a linear scale.
    weights = np.full((8, 8), 0.01)
    weights[:, 0] = 0.9
    weights += np.arange(64).reshape(8, 8) * 1e-5
    assert len(np.unique(images.to_levels(weights, "linear")[:, 1:])) <= 2
    assert len(np.unique(images.to_levels(weights, "quantile")[:, 1:])) > 40


@pytest.mark.parametrize("scale", ["linear", "log", "quantile", "absolute"])
def test_levels_and_codes_of_many_maps_are_each_maps_own(scale):
    # The overview colours and codes all heads in one pass; each map must still be
    # scaled by its own range (a head at 1/10 of another's weights is not 10x darker,
    # except on the absolute scale) and an all-zero map must stay level 0.
    rng = np.random.default_rng(0)
    one = rng.dirichlet(np.ones(6), size=6)                                  # (6, 6), rows sum to 1
    maps = np.stack([one, one / 10, np.zeros_like(one)])                     # (3, 6, 6)
    together = images.to_levels(maps, scale)
    for index in range(3):
        assert np.array_equal(together[index], images.to_levels(maps[index], scale))
    if scale in ("linear", "quantile"):
        assert np.array_equal(together[0], together[1])
    assert not together[2].any()
    assert codes.encode_each(maps) == [codes.encode(m) for m in maps]
    assert images.thumbnails(maps, scale=scale, size=12) == [images.thumbnail(m, scale=scale, size=12) for m in maps]


def test_json_rows_are_records():
    # The JSON text the charts carry holds exactly the rows viz.common.records makes:
    # floats to 4 significant digits, NaN/inf as null, text made visible, even "%" in a name.
    frame = pd.DataFrame({"query": [0, 1], "weight": [0.123456, np.nan], "token": ["a\u202eb", "%s"],
                          "flag": [True, False], "big %": [12345.678, np.inf]})
    from attnjax.viz.common import json_rows, records

    assert json.loads(json_rows(frame)) == records(frame) == [
        {"query": 0, "weight": 0.1235, "token": "a\u27e8U+202E\u27e9b", "flag": True, "big %": 12350.0},
        {"query": 1, "weight": None, "token": "%s", "flag": False, "big %": None}]


# --- script-safe JSON -------------------------------------------------------------------

@pytest.mark.parametrize("text", [HOSTILE, "<!-- x", "a & b", "x\u2028y\u2029z", "</SCRIPT >", "\"'\\"])
def test_script_json_has_nothing_html_can_see(text):
    encoded = script_json({"token": text, "nested": [text, 1.5, float("nan")]})
    assert not set("<>&\u2028\u2029") & set(encoded)
    assert json.loads(encoded) == {"token": text, "nested": [text, 1.5, None]}


# --- frames ---------------------------------------------------------------------------

def test_attention_frame_drops_padding(minilm):
    batch = attnjax.run(minilm, ["A short one.", TEXT])
    frame = viz.attention_frame(batch, batch=0)
    n = int(np.asarray(batch.mask[0]).sum())
    assert n < batch.seq_len  # the first sequence is padded
    assert len(frame) == 6 * 12 * n * n
    assert frame["query"].max() == n - 1 and frame["key"].max() == n - 1
    assert set(frame["query_token"]) == set(batch.tokens[0][:n])


@pytest.fixture(scope="module")
def stats_trace(minilm):
    return attnjax.run(minilm, TEXT * 3, capture=attnjax.Capture(stats=True, pool=8))


def test_pooled_frame_from_stats(stats_trace):
    frame = viz.attention_frame(stats_trace)
    assert frame.attrs["pooled"] == {"bins": 8, "tokens": int(np.asarray(stats_trace.mask[0]).sum())}
    assert len(frame) == 6 * 12 * 8 * 8
    assert frame["query_token"].iloc[0].startswith("0\u2013")  # "start-end first-token"
    spec = chart_spec(viz.attention_heatmap(frame))
    assert "pooled 8 x 8" in json.dumps(spec["title"])


def test_pooled_frame_leaves_out_padding_bins(minilm):
    # "Hi there." is 5 tokens padded to the second text's length: with 8 bins over the
    # padded length, the bins past its last real token hold only padding and are dropped.
    batch = attnjax.run(minilm, ["Hi there.", TEXT], capture=attnjax.Capture(stats=True, pool=8))
    frame = viz.attention_frame(batch, batch=0)
    real = int(np.asarray(batch.mask[0]).sum())
    last_real_bin = (real - 1) * 8 // batch.seq_len
    assert sorted(frame["query"].unique()) == list(range(last_real_bin + 1))
    assert sorted(frame["key"].unique()) == list(range(last_real_bin + 1))
    assert len(frame) == 6 * 12 * (last_real_bin + 1) ** 2
    assert not any("[PAD]" in label for label in frame["query_token"].unique())


def test_overview_rejects_a_start_head_not_in_the_frame(frame):
    with pytest.raises(ValueError, match=r"start=\(9, 0\).*layers \[0, 1, 2, 3, 4, 5\]"):
        viz.model_overview(frame, start=(9, 0))


def test_attention_frame_needs_maps_or_pooled_stats(stats_trace):
    bare = stats_trace.replace(stats=stats_trace.stats.replace(pooled=None))  # as Capture(stats=True) gives
    with pytest.raises(ValueError, match="no attention maps"):
        viz.attention_frame(bare)


# --- chart builders -------------------------------------------------------------------

def test_heatmap_cells_fields_and_scales(trace, frame):
    n = n_tokens(trace)
    for scale in ("linear", "log", "quantile"):
        spec = chart_spec(viz.attention_heatmap(frame, layer=2, head=5, scale=scale, scheme="plasma"))
        unit = next(units(spec))
        assert len(rows_of(spec, unit)) == n * n  # one cell per (query, key), padding excluded
        assert {"query", "key", "query_token", "key_token", "weight"} <= fields(spec)
        colour = unit["encoding"]["color"]
        assert colour["scale"]["scheme"] in ("plasma", {"name": "plasma", "count": 9})
        assert colour["scale"].get("type", "linear") == scale
    # The weights are the trace's, to the 4 significant digits written into the spec.
    cells = pd.DataFrame(rows_of(spec, next(units(spec))))
    expected = np.asarray(trace.attention[2, 0, 5])[cells["query"], cells["key"]]
    np.testing.assert_allclose(cells["weight"], expected, rtol=1e-3, atol=1e-7)


def test_heatmap_rejects_bad_options(frame):
    with pytest.raises(ValueError, match="colour scheme"):
        viz.attention_heatmap(frame, scheme="rainbow")
    with pytest.raises(ValueError, match="colour scale"):
        viz.attention_heatmap(frame, scale="sqrt")
    with pytest.raises(ValueError, match="no rows for layer 9"):
        viz.attention_heatmap(frame, layer=9, head=0)
    with pytest.raises(ValueError, match="lacks column"):
        viz.attention_heatmap(frame.drop(columns="weight"))


def test_heatmap_budget_asks_for_pooled_maps():
    n = viz.HEATMAP_MAX_TOKENS + 1
    index = np.arange(n)
    big = pd.DataFrame({"layer": 0, "head": 0, "query": np.repeat(index, n), "key": np.tile(index, n),
                        "weight": 1.0 / n})
    with pytest.raises(ValueError, match="pool"):
        viz.attention_heatmap(big)


def test_overview_holds_every_head_once(trace, frame, heads):
    n = n_tokens(trace)
    spec = chart_spec(viz.model_overview(frame, scores=heads))
    grid_unit, detail_unit = [u for u in units(spec) if u["mark"]["type"] in ("image", "rect")][:2]
    grid = rows_of(spec, grid_unit)
    assert len(grid) == 6 * 12
    assert all(row["image"].startswith("data:image/png;base64,") for row in grid)
    assert {"category", "entropy"} <= set(grid[0])  # the scores ride along for the tooltip
    code_rows = next(rows for rows in datasets(spec).values() if rows and "codes" in rows[0])
    assert len(code_rows) == 6 * 12 and all(len(row["codes"]) == n * n for row in code_rows)
    decoded = codes.decode(code_rows[0]["codes"]).reshape(n, n)
    np.testing.assert_allclose(decoded, np.asarray(trace.attention[0, 0, 0]), rtol=codes.RELATIVE_ERROR, atol=1e-4)
    select = next(p for p in spec["params"] if p["name"] == "head_select")
    assert select["select"]["fields"] == ["layer", "head"] and set(select["bind"]) == {"layer", "head"}
    assert {"layer", "head", "image"} <= fields(spec)


def test_overview_size_budget_for_bert_base_shape(frame):
    # 12 layers x 12 heads x 128 x 128 is the stated budget; a 12-layer frame of real
    # MiniLM maps stands in for BERT-base (docs/viz.md gives the measured sizes).
    index = np.arange(128)
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(128, 0.3), size=(12, 12, 128))  # (L, H, Q, K) rows sum to 1
    big = pd.DataFrame({
        "layer": np.repeat(np.arange(12), 12 * 128 * 128), "head": np.tile(np.repeat(np.arange(12), 128 * 128), 12),
        "query": np.tile(np.repeat(index, 128), 144), "key": np.tile(index, 144 * 128), "weight": maps.reshape(-1),
    })
    page = to_html(viz.model_overview(big))
    assert len(page.encode()) <= 4_000_000, len(page)  # docs/viz.md: <= 4 MB for BERT-base at 128 tokens
    over = big.assign(layer=big["layer"] + 12)
    with pytest.raises(ValueError, match="budget"):
        viz.model_overview(pd.concat([big, over]))


def test_taxonomy_chart(heads):
    spec = chart_spec(viz.taxonomy_chart(heads))
    cells = rows_of(spec, next(units(spec)))
    assert len(cells) == 6 * 12
    assert {"category", "margin", "layer", "head"} <= fields(spec)
    tooltip = {t["field"] for t in next(units(spec))["encoding"]["tooltip"]}
    assert {"entropy", "previous_token", "decision_score", "category"} <= tooltip
    domain = next(units(spec))["encoding"]["color"]["scale"]["domain"]
    assert set(domain) == set(heads["category"])


def test_layer_similarity_and_focus(trace):
    similarity = analysis.layer_similarity(trace)
    spec = chart_spec(viz.layer_similarity_chart(similarity))
    assert len(rows_of(spec, next(units(spec)))) == 6 * 6
    assert {"layer_a", "layer_b", "value"} <= fields(spec)
    focus_spec = chart_spec(viz.focus_chart(analysis.focus_by_layer(trace)))
    assert {"entropy", "max_weight", "layer"} <= fields(focus_spec)
    assert all(len(rows_of(focus_spec, u)) == 6 for u in units(focus_spec))


def test_token_flow_chart(trace):
    n = n_tokens(trace)
    flow = analysis.token_flow(trace, 3)
    rolled = analysis.rollout_frame(trace, sequence=0)
    spec = chart_spec(viz.token_flow_chart(flow, rolled, heads=True))
    raw_unit, rollout_unit = list(units(spec))
    raw_rows = rows_of(spec, raw_unit)
    assert len(raw_rows) == 6 * 13 and all(len(r["codes"]) == n for r in raw_rows)  # mean + 12 heads per layer
    assert len(rows_of(spec, rollout_unit)) == 6 * n  # the token's rollout row in every layer
    assert any(p["name"] == "flow_head" for p in spec["params"])
    assert "sat" in json.dumps(spec["title"])


def test_token_flow_chart_draws_the_tokens_own_sequence(minilm):
    batch = attnjax.run(minilm, [TEXT, "A second, different sentence about dogs."])
    flow = analysis.token_flow(batch, 2, sequence=1)
    every = analysis.rollout_frame(batch)
    spec = chart_spec(viz.token_flow_chart(flow, every))
    _, rollout_unit = list(units(spec))
    drawn = pd.DataFrame(rows_of(spec, rollout_unit))
    expected = every[(every["sequence"] == 1) & (every["query"] == 2)]
    # The chart carries weights rounded to 4 significant digits, hence rtol 1e-3; sequence
    # 0's row for query 2 differs from sequence 1's by far more than that.
    np.testing.assert_allclose(np.sort(drawn["weight"].to_numpy()), np.sort(expected["weight"].to_numpy()),
                               rtol=1e-3)
    with pytest.raises(ValueError, match="no rows for query 2 of sequence 1"):
        viz.token_flow_chart(flow, analysis.rollout_frame(batch, sequence=0))


def test_anomaly_chart_marks_flagged_heads(heads):
    found = pd.DataFrame({
        "layer": [1, 3, 3, 4], "head": [2, 5, 5, -1], "kind": ["over-dispersed", "jumping", "over-concentrated",
                                                            "layer inconsistency"],
        "score": [0.95, 0.4, 1.0, 4.0], "threshold": [0.9, 0.2, 0.9, 3.5], "flagged": True,
        "detail": ["near uniform", "argmax jumps", "all on [CLS]", "unlike its neighbours"],
    })
    spec = chart_spec(viz.anomaly_chart(found, heads))
    background, marks, counts = units(spec)
    assert len(rows_of(spec, background)) == 6 * 12
    flagged = rows_of(spec, marks)
    assert len(flagged) == 2 + 12  # head (1, 2), head (3, 5), and every head of layer 4
    two = next(r for r in flagged if (r["layer"], r["head"]) == (3, 5))
    assert two["findings"] == 2 and "all on [CLS]" in two["reasons"] and two["kind"] == "several"
    empty = chart_spec(viz.anomaly_chart(found.iloc[:0], heads))
    assert "no anomalies" in json.dumps(empty["title"])


def test_comparison_chart(minilm, trace):
    other = attnjax.run(minilm, "The cat sat on the mat. Then the dog saw a cat.")
    changes = analysis.compare(trace, other)
    spec = chart_spec(viz.comparison_chart(changes))
    cells = rows_of(spec, next(units(spec)))
    assert len(cells) == 6 * 12
    assert next(units(spec))["encoding"]["color"]["field"] == "jsd"
    signed = chart_spec(viz.comparison_chart(changes, value="entropy_diff"))
    assert next(units(signed))["encoding"]["color"]["scale"]["scheme"] == "redblue"  # diverging around 0


def test_next_token_explorer_softmax_is_exact():
    import vl_convert

    logits = np.array([3.0, 1.0, 0.5, -1.0, 2.0])
    top, normalizers = viz.next_token_frames(logits, lambda i: f" tok{i}", k=3)
    assert top["token_id"].tolist() == [0, 4, 1]
    at_one = normalizers.set_index("temperature").loc[1.0, "log_normalizer"]
    assert at_one == pytest.approx(np.log(np.exp(logits).sum()))
    spec = chart_spec(viz.next_token_explorer(top, normalizers))
    assert next(p for p in spec["params"] if p["name"] == "temperature")["bind"]["input"] == "range"
    # Rendered by Vega at the default temperature 1: the top 3 hold their exact softmax mass.
    svg = vl_convert.vegalite_to_svg(spec)
    expected = np.exp(logits)[[0, 4, 1]].sum() / np.exp(logits).sum()
    assert f"top 3 hold {expected:.1%}" in svg


def test_save_image_png_and_svg(tmp_path, frame):
    chart = viz.model_overview(frame)
    png = viz.save_image(chart, tmp_path / "overview.png")
    assert png.read_bytes()[:8] == images.PNG_SIGNATURE
    svg = viz.save_image(viz.attention_heatmap(frame), tmp_path / "head.svg")
    assert "<svg" in svg.read_text()
    with pytest.raises(ValueError, match="format"):
        viz.save_image(chart, tmp_path / "overview.gif")


def test_save_html_is_self_contained(tmp_path, frame):
    path = viz.save_html(viz.attention_heatmap(frame), tmp_path / "head.html")
    page = path.read_text()
    assert "vegaEmbed" in page and "cdn" not in page.lower().split("<script>")[0]
    assert not re.search(r"<script[^>]+src=", page)  # nothing loaded from elsewhere
    assert "connect-src 'none'" in page and "'unsafe-inline'" not in page.split("script-src")[1].split(";")[0]


def test_hostile_tokens_are_escaped_in_the_page(frame):
    hostile = frame.copy()
    hostile["query_token"] = hostile["query_token"].cat.rename_categories(
        lambda t: HOSTILE if t == "cat" else t)
    hostile["key_token"] = hostile["query_token"]
    page = to_html(viz.attention_heatmap(hostile))
    assert HOSTILE not in page
    assert page.lower().count("<script") == 3  # the bundle, the spec (JSON) and the bootstrap


def test_control_characters_in_tokens_are_drawn_visibly(tmp_path, frame):
    # GPT-2 byte tokens decode to control characters; SVG cannot hold them and vl-convert
    # aborts the whole process on one, so every label and tooltip text is made visible.
    odd = {"cat": "\x00", "sat": "a\x06b", "mat": "\ud800", "the": "\n"}
    weird = frame.copy()
    for column in ("query_token", "key_token"):
        # object dtype: with pyarrow installed pandas would infer Arrow strings, which cannot
        # hold a lone surrogate (real tokenizers never produce one; the escaping must still cope)
        renamed = pd.Index([odd.get(t, t) for t in weird[column].cat.categories], dtype=object)
        weird[column] = weird[column].cat.rename_categories(renamed)
    chart = viz.attention_heatmap(weird)
    svg = viz.save_image(chart, tmp_path / "weird.svg").read_text()
    assert "\u2400" in svg and "a\u2406b" in svg and "\u21b5" in svg  # control pictures, return arrow
    viz.save_image(chart, tmp_path / "weird.png")
    viz.save_html(chart, tmp_path / "weird.html", title="tokens \x00 \ud800")
    top, normalizers = viz.next_token_frames(np.array([2.0, 1.0]), lambda i: ["\x00", "\x06"][i], k=2)
    viz.save_image(viz.next_token_explorer(top, normalizers), tmp_path / "next.png")


def test_direction_changing_and_invisible_characters_are_shown_not_applied(frame):
    # U+202E (right-to-left override) makes "hello \u202eevil text" display as "hello txet live";
    # zero-width characters hide in plain sight. The page shows each as a visible tag.
    tricky = {"cat": "hello \u202eevil", "sat": "a\u200bb", "mat": "\u2066x\u2069", "the": "\ufeffthe"}
    odd = frame.copy()
    for column in ("query_token", "key_token"):
        odd[column] = odd[column].cat.rename_categories(lambda t: tricky.get(t, t))
    page = to_html(viz.attention_heatmap(odd), title="title \u202e")
    for code in ("\u202e", "\u200b", "\u2066", "\u2069", "\ufeff"):
        assert code not in page, f"U+{ord(code):04X} reached the page raw"
        assert f"\\u{ord(code):04x}" not in page.lower(), f"U+{ord(code):04X} reached the page as a JSON escape"
    for tag in ("U+202E", "U+200B", "U+2066", "U+2069", "U+FEFF"):
        assert f"\u27e8{tag}\u27e9" in page or tag in page


def test_builders_reject_wrong_frames(frame):
    with pytest.raises(ValueError, match="category"):
        viz.taxonomy_chart(frame.head(3))
    with pytest.raises(TypeError, match="DataFrame"):
        viz.model_overview({"layer": [0]})
    with pytest.raises(ValueError, match="empty"):
        viz.focus_chart(pd.DataFrame(columns=["layer", "entropy", "max_weight"]))


def test_line_and_paragraph_separators_are_shown_as_tags():
    # U+2028 / U+2029 break lines in labels (and end JavaScript strings in old engines)
    from attnjax.viz.common import visible_text

    assert visible_text("a\u2028b\u2029c") == "a\u27e8U+2028\u27e9b\u27e8U+2029\u27e9c"
