"""Self-contained, injection-safe HTML (and PNG/SVG) export of charts and reports.

The page this writes:

- inlines Vega, Vega-Lite and vega-embed (the bundle vl-convert ships), so it
  renders with no network; a Content-Security-Policy forbids any fetch anyway
  (``connect-src 'none'``, images only from ``data:`` URLs);
- carries every chart spec as JSON inside ``<script type="application/json">``
  with ``<``, ``>``, ``&`` and U+2028/9 written as ``\\u003c`` etc., so no token
  text can close the element or open another (Altair's and vl-convert's own HTML
  paste the spec into a script unescaped: a token ``</script><script>...``
  runs there). The JSON is read with ``JSON.parse(element.textContent)``;
- runs only the two scripts it wrote: the CSP allows scripts by their SHA-256
  hashes, not ``'unsafe-inline'``, so even markup that slipped through could not
  run a script (``'unsafe-eval'`` stays: Vega compiles its expressions);
- escapes all other text (titles, captions, tables) with ``html.escape``;
- shows tooltips through vega-tooltip, which escapes HTML by default, and sets
  ``data-attnjax-rendered`` / ``data-attnjax-errors`` on ``<body>`` once every
  chart has drawn, which the tests read.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import altair as alt
import numpy as np

from attnjax.viz.common import visible_text

CHART_MIME = "application/json"
EMBED_ACTIONS = {"export": True, "source": False, "compiled": False, "editor": False}

_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}

BOOTSTRAP_JS = """\
(function () {
  var body = document.body;
  var nodes = document.querySelectorAll('script[type="application/json"][data-attnjax-chart]');
  var drawn = 0, errors = [];
  var jobs = Array.prototype.map.call(nodes, function (node) {
    var target = document.getElementById(node.getAttribute('data-attnjax-chart'));
    try {
      var payload = JSON.parse(node.textContent);
      return vegaEmbed(target, payload.spec, payload.options).then(function () { drawn += 1; },
        function (err) { errors.push(String(err)); target.textContent = 'This chart could not be drawn: ' + err; });
    } catch (err) {
      errors.push(String(err));
      target.textContent = 'This chart could not be drawn: ' + err;
      return Promise.resolve();
    }
  });
  Promise.all(jobs).then(function () {
    body.setAttribute('data-attnjax-errors', String(errors.length));
    body.setAttribute('data-attnjax-rendered', String(drawn));
  });
})();
"""

# Pixels a chart may span on the report page: PAGE_CSS's max-width less its padding.
PAGE_CONTENT_WIDTH = 1320 - 2 * 16

PAGE_CSS = """\
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 24px auto; max-width: 1320px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.note { color: #555; margin: 4px 0 10px; max-width: 900px; }
table.meta { border-collapse: collapse; margin: 8px 0; }
table.meta td, table.meta th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
table.meta th { background: #f6f6f6; font-weight: 600; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; white-space: pre-wrap;
          word-break: break-all; background: #f8f8f8; padding: 6px 8px; max-height: 160px; overflow: auto; }
.chart { margin: 8px 0 16px; overflow-x: auto; }
"""


def _vl_version() -> str:
    """vl-convert's name for the Vega-Lite version Altair writes (e.g. '6.4')."""
    major_minor = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    import vl_convert

    known = vl_convert.get_vegalite_versions()
    return major_minor if major_minor in known else known[-1]


def _bundle_cache_path() -> Path:
    import vl_convert

    from attnjax.cache import DEFAULT_DIR

    version = getattr(vl_convert, "__version__", "unknown")
    return Path(DEFAULT_DIR).parent / "vega" / f"bundle-vl-convert-{version}-vl-{_vl_version()}.js"


@functools.lru_cache(maxsize=1)
def javascript_bundle() -> str:
    """Vega + Vega-Lite + vega-embed as one classic script (about 0.9 MB).

    vl-convert builds it in about 2 s; the result is kept on disk next to JAX's
    compilation cache (~/.cache/attnjax/vega/, or under $ATTNJAX_CACHE's parent).
    """
    import vl_convert

    cache = _bundle_cache_path()
    try:
        bundle = cache.read_text(encoding="utf-8")
        if "window.vegaEmbed" not in bundle[-2000:]:  # truncated or foreign file: rebuild it
            raise OSError("incomplete bundle")
    except OSError:
        bundle = vl_convert.javascript_bundle(vl_version=_vl_version())
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(bundle, encoding="utf-8")
            partial.replace(cache)  # atomic: concurrent writers never leave half a file
        except OSError:
            pass  # a read-only home only costs the 2 s again next time
    lowered = bundle.lower()
    if "</script" in lowered or "<!--" in lowered:  # would end the inline script early
        raise RuntimeError("The vl-convert JavaScript bundle contains '</script' or '<!--'; it cannot be inlined.")
    return bundle


def script_json(value: Any) -> str:
    """JSON safe to place inside a <script> element: no '<', '>', '&' or U+2028/9 in it."""
    text = json.dumps(_plain(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    for char, escape in _SCRIPT_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def _plain(value: Any) -> Any:
    """Replace numpy scalars/arrays by Python values and non-finite floats by null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csp_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def chart_spec(chart: Any) -> Dict[str, Any]:
    """The Vega-Lite spec (a dict) of an Altair chart or a spec dict."""
    if isinstance(chart, Mapping):
        return dict(chart)
    if hasattr(chart, "to_dict"):
        with alt.data_transformers.disable_max_rows():
            return chart.to_dict()
    raise TypeError(f"Expected an Altair chart or a Vega-Lite spec dict; got {type(chart).__name__}.")


def embed_options(spec: Mapping[str, Any], renderer: Optional[str] = None) -> Dict[str, Any]:
    """vega-embed options: no editor/source links (they need the network), tooltips on."""
    hint = (spec.get("usermeta") or {}).get("attnjax", {}).get("renderer")
    return {"renderer": renderer or hint or "svg", "actions": dict(EMBED_ACTIONS), "tooltip": True}


class Block:
    """One piece of a page: a heading, escaped text, an HTML table, or a chart."""

    def __init__(self, kind: str, content: Any, **extra: Any):
        self.kind = kind
        self.content = content
        self.extra = extra


def _text(value: Any) -> str:
    """Escaped, visible text for the page (control characters shown, markup inert)."""
    return html.escape(visible_text(value))


def render_page(title: str, blocks: Sequence[Block], *, renderer: Optional[str] = None) -> str:
    """A complete HTML document for ``blocks`` (see :class:`Block`)."""
    parts: List[str] = []
    charts = 0
    for block in blocks:
        if block.kind == "h1":
            parts.append(f"<h1>{_text(block.content)}</h1>")
        elif block.kind == "h2":
            anchor = html.escape(str(block.extra.get("anchor", "")), quote=True)
            attr = f' id="{anchor}"' if anchor else ""
            parts.append(f"<h2{attr}>{_text(block.content)}</h2>")
        elif block.kind == "note":
            parts.append(f'<p class="note">{_text(block.content)}</p>')
        elif block.kind == "tokens":
            parts.append(f'<div class="tokens">{_text(block.content)}</div>')
        elif block.kind == "table":
            parts.append(_table_html(block.content))
        elif block.kind == "chart":
            spec = chart_spec(block.content)
            target = f"attnjax-chart-{charts}"
            payload = {"spec": spec, "options": embed_options(spec, renderer)}
            parts.append(f'<div class="chart" id="{target}"></div>')
            parts.append(
                f'<script type="{CHART_MIME}" data-attnjax-chart="{target}">{script_json(payload)}</script>'
            )
            charts += 1
        else:
            raise ValueError(f"Unknown page block kind {block.kind!r}.")
    bundle = javascript_bundle()
    csp = "; ".join([  # only fixed text and base64 hashes: safe inside the attribute as is
        "default-src 'none'",
        f"script-src {_csp_hash(bundle)} {_csp_hash(BOOTSTRAP_JS)} 'unsafe-eval'",
        "style-src 'unsafe-inline'",
        "img-src data: blob:",
        "font-src data:",
        "connect-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ])
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',  # no quote or markup in it
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title>",
        f"<style>{PAGE_CSS}</style>",
        f"<script>{bundle}</script>",
        "</head>",
        "<body>",
        "<noscript>These charts need JavaScript (it is inlined: no network is used).</noscript>",
        *parts,
        f"<script>{BOOTSTRAP_JS}</script>",
        "</body>",
        "</html>",
        "",
    ])


def _table_html(rows: Union[Sequence[Sequence[Any]], "Any"]) -> str:
    """An escaped HTML table from a DataFrame or a list of (header, value) rows."""
    if hasattr(rows, "columns"):
        header = "".join(f"<th>{_text(c)}</th>" for c in rows.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_text(_cell(v))}</td>" for v in record) + "</tr>"
            for record in rows.itertuples(index=False)
        )
        return f'<table class="meta"><tr>{header}</tr>{body}</table>'
    body = "".join(
        f"<tr><th>{_text(name)}</th><td>{_text(_cell(value))}</td></tr>" for name, value in rows
    )
    return f'<table class="meta">{body}</table>'


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def to_html(chart_or_report: Any, *, title: Optional[str] = None, renderer: Optional[str] = None) -> str:
    """The self-contained HTML page of a chart, a spec dict, or a Report, as a string."""
    if hasattr(chart_or_report, "blocks") and hasattr(chart_or_report, "title"):
        return render_page(title or chart_or_report.title, chart_or_report.blocks, renderer=renderer)
    spec = chart_spec(chart_or_report)
    if title is None:
        raw = spec.get("title")
        title = raw.get("text") if isinstance(raw, Mapping) else raw
        title = title if isinstance(title, str) and title else "attnjax chart"
    return render_page(title, [Block("chart", spec)], renderer=renderer)


def save_html(chart_or_report: Any, path: Union[str, os.PathLike], *, title: Optional[str] = None,
              renderer: Optional[str] = None) -> Path:
    """Write ``chart_or_report`` as one self-contained HTML file; returns the path.

    The file opens offline in any browser (Vega, Vega-Lite and vega-embed are
    inlined) and renders token text as text: see this module's docstring.
    """
    page = to_html(chart_or_report, title=title, renderer=renderer)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def save_image(chart: Any, path: Union[str, os.PathLike], *, format: Optional[str] = None,
               scale: float = 2.0) -> Path:
    """Write a chart as PNG or SVG through vl-convert (format from the suffix by default)."""
    import vl_convert

    path = Path(path)
    kind = (format or path.suffix.lstrip(".")).lower()
    spec = chart_spec(chart)
    if kind == "png":
        path.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=_vl_version(), scale=scale))
    elif kind == "svg":
        path.write_text(vl_convert.vegalite_to_svg(spec, vl_version=_vl_version()), encoding="utf-8")
    else:
        raise ValueError(f"Cannot export {path.name!r}: format {kind!r} is not 'png' or 'svg'.")
    return path
