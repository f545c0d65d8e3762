"""A model's structure as charts, from its params pytree and config (the model is not run).

``model_structure(model)``: the module tree of attnjax.models.summary as an indented
table (module, shape, parameters, FLOPs per token) that folds with a depth slider and
a block dropdown (one block open at a time), beside the attention path of one block as
a small graph (projections, RoPE, q.k scale, soft-cap, mask, softmax, weighted sum of
v, output projection), with each tensor's shape.
"""

from __future__ import annotations

from typing import List, Tuple

import altair as alt
import pandas as pd

from attnjax.models.structure import summary
from attnjax.viz.common import inline, title

ROW = 15            # px per table row
INDENT = 14         # px per tree level
NAME_WIDTH = 300    # px of the module column
COLUMNS_AT = {"shape": NAME_WIDTH, "params": NAME_WIDTH + 110, "flops_per_token": NAME_WIDTH + 200}
START_DEPTH = 4


def structure_frames(model) -> Tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(tree rows, graph nodes, graph edges) for model_structure."""
    rows = summary(model)
    rows = rows.assign(order=range(len(rows)),
                       opens_block=[r.block >= 0 and r.module.rsplit("/", 1)[-1].endswith(f"_{r.block}")
                                    for r in rows.itertuples()])
    nodes, edges = attention_path(model)
    return rows, nodes, edges


def attention_path(model) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Nodes (id, label, detail, col, row) and edges (source, target) of one block's attention."""
    c = model.config
    heads, head_dim = c.num_heads, c.head_dim
    kv_heads = getattr(c, "num_kv_heads", heads)
    family = model.family
    llama = family not in ("bert", "gpt2")
    nodes: List[Tuple[str, str, str, int, int]] = [("x", "hidden states", f"(T, {c.hidden_size})", 1, 0)]
    edges: List[Tuple[str, str]] = []
    last = "x"
    if family != "bert":
        nodes.append(("norm", "RMSNorm" if llama else "LayerNorm (ln_1)", "pre-norm", 1, 1))
        edges.append(("x", "norm"))
        last = "norm"
    row = 2
    for col, (name, count) in enumerate((("q", heads), ("k", kv_heads), ("v", kv_heads))):
        nodes.append((name, f"{name} projection", f"(T, {count} \u00d7 {head_dim})", col, row))
        edges.append((last, name))
    row += 1
    q, k = "q", "k"
    if getattr(c, "qk_norm", False):
        nodes += [("qn", "q norm", "RMSNorm per head", 0, row), ("kn", "k norm", "RMSNorm per head", 1, row)]
        edges += [("q", "qn"), ("k", "kn")]
        q, k, row = "qn", "kn", row + 1
    if llama:
        nodes += [("qr", "RoPE", "rotate q", 0, row), ("kr", "RoPE", "rotate k", 1, row)]
        edges += [(q, "qr"), (k, "kr")]
        q, k, row = "qr", "kr", row + 1
    group = f", {heads // kv_heads} q heads per kv head" if kv_heads != heads else ""
    scale = model.attention_scale(0)
    nodes.append(("scores", "q\u00b7k\u1d40 \u00d7 scale", f"(H, T, T), scale {scale:.4g}{group}", 0, row))
    edges += [(q, "scores"), (k, "scores")]
    last, row = "scores", row + 1
    softcap = getattr(c, "attn_logit_softcapping", None)
    if softcap is not None:
        nodes.append(("cap", "soft-cap", f"{softcap:g} tanh(s / {softcap:g})", 0, row))
        edges.append((last, "cap"))
        last, row = "cap", row + 1
    windows = sorted({w for w in getattr(c, "windows", ()) if w is not None})
    mask = "padding" + (", causal" if model.causal else "") + (
        f", window {'/'.join(map(str, windows))} on some layers" if windows else "")
    nodes += [("mask", "mask", mask, 0, row), ("softmax", "softmax", "over keys", 0, row + 1),
              ("wv", "weights \u00b7 v", f"(T, {heads} \u00d7 {head_dim})", 1, row + 2),
              ("o", "output projection", f"(T, {c.hidden_size})", 1, row + 3),
              ("res", "+ residual" + (", LayerNorm" if family == "bert" else ""), f"(T, {c.hidden_size})", 1,
               row + 4)]
    edges += [(last, "mask"), ("mask", "softmax"), ("softmax", "wv"), ("v", "wv"), ("wv", "o"), ("o", "res")]
    node_frame = pd.DataFrame(nodes, columns=["id", "label", "detail", "col", "row"])
    place = node_frame.set_index("id")
    edge_frame = pd.DataFrame([{"source": a, "target": b, "col": place.loc[a, "col"], "row": place.loc[a, "row"],
                                "col2": place.loc[b, "col"], "row2": place.loc[b, "row"]} for a, b in edges])
    return node_frame, edge_frame


def model_structure(model) -> alt.HConcatChart:
    """The module tree with shapes, parameters and FLOPs per token, and one block's attention path.

    Built from ``model.params`` and ``model.config`` only. The tree folds with the
    ``structure_depth`` slider and shows the inside of one block at a time
    (``structure_block``). FLOPs per token as attnjax.models.summary defines them
    (matmuls only; attention at ``summary``'s default context length).
    """
    rows, nodes, edges = structure_frames(model)
    max_depth = int(rows["depth"].max())
    blocks = sorted(int(b) for b in rows["block"].unique() if b >= 0)
    depth = alt.param(name="structure_depth", value=min(START_DEPTH, max_depth),
                      bind=alt.binding_range(min=1, max=max_depth, step=1, name="tree depth "))
    params = [depth]
    visible = "datum.depth <= structure_depth"
    if blocks:
        block = alt.param(name="structure_block", value=blocks[0],
                          bind=alt.binding_select(options=blocks, name="open block "))
        params.append(block)
        visible += " && (datum.block < 0 || datum.opens_block || datum.block == structure_block)"
    tokens = rows.attrs.get("tokens", 0)
    base = alt.Chart()  # the rows are attached once, to the layer below: Altair deep-copies a chart's data on every call
    y = alt.Y("line:O", axis=None)
    name = base.mark_text(align="left", fontSize=11).encode(
        x=alt.X("depth:Q", scale=alt.Scale(domain=[0, max_depth], range=[0, max_depth * INDENT]), axis=None),
        y=y, text="name:N",
        color=alt.condition("datum.kind == 'param'", alt.value("#777"), alt.value("#111")),
        tooltip=[alt.Tooltip("module:N"), alt.Tooltip("shape:N"), alt.Tooltip("params:Q", format=","),
                 alt.Tooltip("flops_per_token:Q", title="FLOPs per token", format=",")])
    columns = [
        base.mark_text(align="left", fontSize=11, color="#555").encode(
            x=alt.value(COLUMNS_AT["shape"]), y=y, text="shape:N"),
        base.mark_text(align="right", fontSize=11).encode(
            x=alt.value(COLUMNS_AT["params"] + 60), y=y, text=alt.Text("params:Q", format=",")),
        base.mark_text(align="right", fontSize=11).encode(
            x=alt.value(COLUMNS_AT["flops_per_token"] + 100), y=y,
            text=alt.Text("flops_per_token:Q", format=",")),
    ]
    header = alt.Chart(inline([{"x": COLUMNS_AT["shape"], "text": "shape"},
                               {"x": COLUMNS_AT["params"] + 15, "text": "params"},
                               {"x": COLUMNS_AT["flops_per_token"] + 20, "text": "FLOPs / token"},
                               {"x": 0, "text": "module"}])).mark_text(
        fontWeight="bold", fontSize=11, align="left", dy=-12).encode(
            x=alt.X("x:Q", scale=None, axis=None), y=alt.value(0), text="text:N")
    table = alt.layer(name, *columns).transform_filter(visible).transform_window(
        line="row_number()", sort=[alt.SortField("order")])
    table.data = inline(rows)
    tree = alt.layer(table, header).properties(
        width=COLUMNS_AT["flops_per_token"] + 110, height=alt.Step(ROW),
        title=title("Module tree", [f"{int(rows['params'].iloc[0]):,} parameters \u00b7 FLOPs per token: "
                                    f"2 \u00d7 in \u00d7 out per weight matrix, attention at {tokens} keys",
                                    "fold with the tree depth slider; open one block at a time"]))
    graph_base = alt.Chart(inline(nodes))
    px = alt.X("col:Q", scale=alt.Scale(domain=[-0.6, 2.6]), axis=None)
    py = alt.Y("row:Q", scale=alt.Scale(domain=[-0.6, float(nodes["row"].max()) + 0.6], reverse=True), axis=None)
    links = alt.Chart(inline(edges)).mark_rule(color="#999", strokeWidth=1.5).encode(
        x=px, y=py, x2="col2:Q", y2="row2:Q")
    boxes = graph_base.mark_rect(width=130, height=30, fill="#eef3fa", stroke="#4c78a8", cornerRadius=4).encode(
        x=px, y=py, tooltip=[alt.Tooltip("label:N"), alt.Tooltip("detail:N")])
    labels = graph_base.mark_text(fontSize=10, dy=-5, fontWeight="bold").encode(x=px, y=py, text="label:N")
    details = graph_base.mark_text(fontSize=8, dy=7, color="#444", limit=126).encode(x=px, y=py, text="detail:N")
    graph = alt.layer(links, boxes, labels, details).properties(
        width=440, height=int(nodes["row"].max() + 1) * 48,
        title=title("Attention path of one block", f"{model.family}: {model.config.num_heads} heads of "
                                                   f"{model.config.head_dim} dims; T = tokens, H = heads"))
    return (
        alt.hconcat(tree, graph, spacing=40)
        .add_params(*params)
        .properties(title=title(f"Model structure: {model.name or model.family}",
                                "from the parameters and the config; the model is not run"))
    )
