"""Colour scales that do not mislead, and long inputs that stay legible (issue 10).

Spec-level checks on constructed maps whose answer is known: the legend states the
data's range and the linear domain is exactly it; the absolute scale is [0, 1];
near-uniform heads are marked (and peaked ones are not); pooled maps say "block
mean"; long maps zoom and thin labels; the charts fit the report page at 200 tokens.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from attnjax import viz
from attnjax.viz import images
from attnjax.viz.common import NEAR_UNIFORM_TV, SCALES, uniform_deviation
from attnjax.viz.html import PAGE_CONTENT_WIDTH, chart_spec


def long_frame(maps: np.ndarray, pooled: bool = False) -> pd.DataFrame:
    """An attention frame of (L, H, Q, K) maps with tokens "t0", "t1", ..."""
    n_layers, n_heads, n_q, n_k = maps.shape
    index = np.indices(maps.shape).reshape(4, -1)
    frame = pd.DataFrame({"layer": index[0], "head": index[1], "query": index[2], "key": index[3],
                          "weight": maps.reshape(-1),
                          "query_token": [f"t{i}" for i in index[2]], "key_token": [f"t{i}" for i in index[3]]})
    if pooled:
        frame.attrs["pooled"] = {"bins": n_q, "tokens": 4 * n_q}
    return frame


def near_uniform_map(n: int, spread: float = 0.05, seed: int = 0) -> np.ndarray:
    """(n, n) rows of weights 1/n x (1 +- spread): the 0.0048-0.0053 case of the issue at n=200."""
    rng = np.random.default_rng(seed)
    rows = 1.0 + rng.uniform(-spread, spread, size=(n, n))
    return rows / rows.sum(axis=1, keepdims=True)


def peaked_map(n: int) -> np.ndarray:
    """Each query puts 0.9 on the previous token and spreads 0.1 over the rest."""
    weights = np.full((n, n), 0.1 / (n - 1))
    weights[np.arange(n), np.maximum(np.arange(n) - 1, 0)] = 0.9
    weights[0] = 1.0 / n
    return weights / weights.sum(axis=1, keepdims=True)


def unit(spec: dict) -> dict:
    return spec if "mark" in spec else next(unit(c) for k in ("layer", "hconcat", "vconcat") for c in spec.get(k, []))


# --- near-uniform: the definition ------------------------------------------------------

def test_uniform_deviation_is_the_largest_row_total_variation():
    uniform = np.full((4, 4), 0.25)
    assert uniform_deviation(uniform) == pytest.approx(0.0)
    half = np.array([[0.5, 0.5, 0.0, 0.0]] * 4)       # half the mass misplaced: TV 0.5
    assert uniform_deviation(half) == pytest.approx(0.5)
    one_row_off = uniform.copy()
    one_row_off[2] = [0.4, 0.2, 0.2, 0.2]               # TV = 1/2 (0.15 + 3 x 0.05) = 0.15
    assert uniform_deviation(one_row_off) == pytest.approx(0.15)
    # A causal map spreading evenly over the keys it can see is exactly uniform.
    causal = np.tril(np.ones((5, 5))) / np.arange(1, 6)[:, None]
    assert uniform_deviation(causal) == pytest.approx(0.0)
    # Batched over (L, H); a 1 x 1 map has no row with a choice: NaN, never "near-uniform".
    assert uniform_deviation(np.stack([uniform, half])).tolist() == pytest.approx([0.0, 0.5])
    assert np.isnan(uniform_deviation(np.ones((1, 1))))


def test_near_uniform_head_is_marked_and_a_peaked_one_is_not():
    n = 200
    flat, peaked = near_uniform_map(n), peaked_map(n)
    assert 0.0047 < flat.min() and flat.max() < 0.0054       # the 0.0048-0.0053
    assert uniform_deviation(flat) <= NEAR_UNIFORM_TV < uniform_deviation(peaked)
    frame = long_frame(np.stack([flat, peaked])[None])       # layer 0: head 0 flat, head 1 peaked
    flat_title = json.dumps(chart_spec(viz.attention_heatmap(frame, head=0))["title"])
    peaked_title = json.dumps(chart_spec(viz.attention_heatmap(frame, head=1))["title"])
    assert "near-uniform" in flat_title and "near-uniform" not in peaked_title
    # The overview marks the same head on its grid, and names it in the large view's title.
    spec = chart_spec(viz.model_overview(long_frame(np.stack([flat[:64, :64] / flat[:64, :64].sum(1, keepdims=True),
                                                              peaked_map(64)])[None])))
    tables = [json.loads(rows) if isinstance(rows, str) else rows for rows in spec["datasets"].values()]
    grid = next(rows for rows in tables if rows and "marker" in rows[0])
    assert [row["marker"] for row in grid] == ["\u2248", ""]
    info = next(p["value"] for p in spec["params"] if p["name"] == "overview_heads")
    assert "near-uniform" in info["0,0"]["text"] and "near-uniform" not in info["0,1"]["text"]


# --- legend and scale domains ---------------------------------------------------------

def test_linear_legend_and_domain_are_the_data_range():
    flat = near_uniform_map(40)
    spec = chart_spec(viz.attention_heatmap(long_frame(flat[None, None])))
    colour = unit(spec)["encoding"]["color"]
    low, high = float(flat.min()), float(flat.max())
    assert colour["scale"]["domain"] == pytest.approx([low, high], rel=1e-3)
    assert colour["scale"]["nice"] is False
    assert colour["legend"]["values"] == pytest.approx([low, high], rel=1e-3)
    assert f"range {low:.3g}\u2013{high:.3g}" in colour["legend"]["title"]


def test_absolute_scale_is_zero_to_one_everywhere():
    flat = near_uniform_map(40)
    frame = long_frame(flat[None, None])
    colour = unit(chart_spec(viz.attention_heatmap(frame, scale="absolute")))["encoding"]["color"]
    assert colour["scale"]["domain"] == [0, 1] and colour["scale"]["clamp"] is True
    assert "of 0\u20131" in colour["legend"]["title"][1]
    overview = chart_spec(viz.model_overview(frame, scale="absolute"))
    detail = overview["hconcat"][1]
    assert detail["encoding"]["color"]["scale"]["domain"] == [0, 1]
    # Thumbnails too: weights of 0.025 are near the bottom of the palette, not its top.
    assert images.to_levels(flat, "absolute").max() <= 8 < images.to_levels(flat, "linear").max()
    assert "absolute" in SCALES


def test_overview_detail_domain_follows_the_selected_head():
    maps = np.stack([near_uniform_map(20), peaked_map(20)])[None]
    spec = chart_spec(viz.model_overview(long_frame(maps)))
    domain = spec["hconcat"][1]["encoding"]["color"]["scale"]["domain"]
    assert [d["expr"] for d in domain] == [
        "overview_heads[head_select_layer + ',' + head_select_head].low",
        "overview_heads[head_select_layer + ',' + head_select_head].high"]
    info = next(p["value"] for p in spec["params"] if p["name"] == "overview_heads")
    assert info["0,1"]["low"] == pytest.approx(float(peaked_map(20).min()), rel=1e-3)
    assert info["0,1"]["high"] == pytest.approx(0.9, rel=1e-3)


# --- pooled maps ------------------------------------------------------------------------

def test_pooled_maps_are_labelled_block_means():
    frame = long_frame(near_uniform_map(16)[None, None], pooled=True)
    spec = chart_spec(viz.attention_heatmap(frame))
    assert "block means" in spec["title"]["text"] and "Block means" in spec["title"]["subtitle"][0]
    encoding = unit(spec)["encoding"]
    assert encoding["color"]["legend"]["title"][0] == "block mean"
    assert "block mean" in [t.get("title") for t in encoding["tooltip"]]
    overview = chart_spec(viz.model_overview(frame))
    assert "Block means" in overview["hconcat"][1]["title"]["text"]["expr"]
    assert "block means" in json.dumps(overview["hconcat"][0]["title"])
    assert "block mean (\u00b15%)" in [t.get("title") for t in overview["hconcat"][1]["encoding"]["tooltip"]]
    plain = chart_spec(viz.attention_heatmap(long_frame(near_uniform_map(16)[None, None])))
    assert "block mean" not in json.dumps(plain["title"]).lower()


# --- long inputs ---------------------------------------------------------------------------

def test_long_maps_zoom_and_thin_labels_with_every_token_on_hover():
    n = 200
    spec = chart_spec(viz.attention_heatmap(long_frame(peaked_map(n)[None, None])))
    zoom = [p for p in spec["params"] if p.get("bind") == "scales"]
    assert zoom and zoom[0]["select"]["type"] == "interval"
    encoding = unit(spec)["encoding"]
    for channel in ("x", "y"):
        axis = encoding[channel]["axis"]
        assert axis["labelOverlap"] == "greedy" and axis["tickCount"] == n and axis["tickMinStep"] == 1
        assert encoding[channel]["scale"]["domain"] == [-0.5, n - 0.5]
    labels = next(p["value"] for p in spec["params"] if p["name"] == "key_labels")
    assert len(labels) == n and labels["199"] == "t199"           # every token has its label
    assert {"query_token", "key_token"} <= {t["field"] for t in encoding["tooltip"]}


def flow_frames(n_keys: int, n_layers: int = 6, n_heads: int = 12):
    rng = np.random.default_rng(1)
    rows = []
    for layer in range(n_layers):
        for head in [-1] + list(range(n_heads)):
            weights = rng.dirichlet(np.full(n_keys, 0.5))
            rows += [{"layer": layer, "head": head, "query": n_keys - 1, "query_token": "last", "key": k,
                      "key_token": f"t{k}", "weight": w} for k, w in enumerate(weights)]
    raw = pd.DataFrame(rows)
    rollout = pd.DataFrame([{"layer": layer, "query": n_keys - 1, "key": k, "weight": w}
                            for layer in range(n_layers) for k, w in enumerate(rng.dirichlet(np.ones(n_keys)))])
    return raw, rollout


def svg_width(chart) -> float:
    import vl_convert

    svg = vl_convert.vegalite_to_svg(chart_spec(chart))
    return float(re.search(r'<svg[^>]*\bwidth="([\d.]+)"', svg).group(1))


@pytest.mark.parametrize("n_keys", [12, 200])
def test_token_flow_fits_the_page_and_is_not_a_thin_strip(n_keys):
    raw, rollout = flow_frames(n_keys)
    chart = viz.token_flow_chart(raw, rollout, heads=True)
    assert svg_width(chart) <= PAGE_CONTENT_WIDTH
    spec = chart_spec(chart)
    panels = spec["vconcat"]
    assert len(panels) == 2 and all(p["height"]["step"] >= 24 for p in panels)  # rows tall enough to read
    assert spec["resolve"]["scale"]["x"] == "shared"                            # one zoom for both panels
    assert any(p.get("bind") == "scales" for p in spec["params"] + panels[0].get("params", []))


def test_overview_and_heatmap_fit_the_page_at_200_tokens():
    heatmap = viz.attention_heatmap(long_frame(peaked_map(200)[None, None]))
    assert svg_width(heatmap) <= PAGE_CONTENT_WIDTH
    # The report draws 200 tokens on MiniLM as pooled 64 x 64 maps (over the full-map budget).
    pooled = long_frame(np.broadcast_to(near_uniform_map(64), (6, 12, 64, 64)).copy(), pooled=True)
    assert svg_width(viz.model_overview(pooled)) <= PAGE_CONTENT_WIDTH


def test_report_offers_every_colour_scale():
    from attnjax.cli import build_parser

    assert build_parser().parse_args(["report", "--scale", "absolute"]).scale == "absolute"
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["report"]._actions
                  if a.dest == "scale")
    assert tuple(action.choices) == SCALES
