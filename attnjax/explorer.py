"""``attnjax.explore(model)`` (this module is attnjax.explorer): type a text, pick a layer and a head, see its attention.

In Jupyter or Colab the explorer shows a text box, layer and head selectors, a
colour-scale selector, the selected head's heatmap and the model overview
(ipywidgets, which both ship). The callbacks are the plain methods of
:class:`Explorer` (``set_text``, ``set_layer``, ``set_head``, ``set_scale``), so
the same object works without a notebook::

    explorer = attnjax.explore(model, "The cat sat on the mat.")
    explorer.set_text("She went home.")      # re-runs the model
    explorer.set_head(3)
    explorer.heatmap()                        # an Altair chart

A new text reuses attnjax.run's length buckets (16, 32, 64, 128, 256 tokens), and the
explorer compiles every bucket on a background thread as it opens (``warm_up``), so
no text waits for a compilation; benchmarks/interactive.py times the action ->
updated view path. Bad input (an empty text, too many tokens,
a layer out of range) leaves the last view in place and shows a one-line message
in the widget (``Explorer.message``) instead of a traceback.
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Dict, List, Optional

import altair as alt
import numpy as np
import pandas as pd

from attnjax.analysis import classify_heads, head_scores
from attnjax.api import run
from attnjax.tokenize import bucket_length, tokenize
from attnjax.trace import Capture
from attnjax.viz.attention import attention_heatmap
from attnjax.viz.common import SCALES, check_scale, check_scheme
from attnjax.viz.frames import HEATMAP_MAX_TOKENS, OVERVIEW_MAX_WEIGHTS, attention_frame, sequence_tokens
from attnjax.viz.overview import opened_at, overview_spec

DEFAULT_TEXT = "The cat sat on the mat. Then the cat saw a dog."
WIDGETS_MISSING = ("attnjax.explore needs ipywidgets for its text box and selectors (Jupyter and Colab "
                   "ship it); install it with `pip install ipywidgets`. The charts are still available "
                   "as explorer.heatmap() and explorer.overview().")
CAPTURE = Capture(attention=True)


# Background warm-ups still running: (stop event, thread). At exit each is told to stop
# and joined: an interpreter that exits while XLA compiles on another thread aborts
# ("terminate called ... FATAL: exception not rethrown").
_WARM_UPS: List[tuple] = []
WARM_UP_EXIT_WAIT_S = 60.0  # the longest a script's exit waits for a compilation to finish


def _start_warm_up(warm_up) -> threading.Thread:
    stop = threading.Event()
    thread = threading.Thread(target=warm_up, args=(stop,), name="attnjax-explore-warm-up", daemon=True)
    _WARM_UPS[:] = [(event, other) for event, other in _WARM_UPS if other.is_alive()] + [(stop, thread)]
    thread.start()
    return thread


@atexit.register
def _stop_warm_ups() -> None:
    for stop, _ in _WARM_UPS:
        stop.set()
    for _, thread in _WARM_UPS:
        thread.join(timeout=WARM_UP_EXIT_WAIT_S)


def _widgets():
    """ipywidgets, imported on first use (it is not a dependency of attnjax)."""
    try:
        import ipywidgets
    except ImportError as error:
        raise ImportError(WIDGETS_MISSING) from error
    return ipywidgets


class Explorer:
    """One model, the current text's Trace, and the selected layer and head.

    Every ``set_*`` method returns True when the view changed and False when the
    input was refused; a refusal leaves the previous state and sets ``message``
    (the widget shows it). ``timings`` holds the last action's milliseconds by
    stage (run, analyses, heatmap, overview), each stage's chart built as far as
    its Vega-Lite spec.
    """

    def __init__(self, model, text: str = DEFAULT_TEXT, *, layer: int = 0, head: int = 0,
                 scheme: str = "viridis", scale: str = "linear", overview: bool = True, warm: bool = True):
        self.model = model
        self.scheme = check_scheme(scheme)
        self.scale = check_scale(scale)
        self.show_overview = bool(overview)
        self.layer, self.head = 0, 0
        self.text = ""
        self.trace = None
        self.heads: Optional[pd.DataFrame] = None
        self.message = ""
        self.timings: Dict[str, float] = {}
        self._views: Dict[str, object] = {}
        self._specs: Dict[str, dict] = {}  # each view's Vega-Lite spec, built once, what the widget shows
        self._on_change = []
        if not self.set_text(text):
            raise ValueError(f"explore(text=...): {self.message}")
        if not (self.set_layer(layer) and self.set_head(head)):
            raise ValueError(f"explore(layer={layer}, head={head}): {self.message}")
        self.warming: Optional[threading.Thread] = None
        if warm:  # compile the other length buckets while the user reads the first view
            self.warming = _start_warm_up(self.warm_up)

    def warm_up(self, stop: Optional[threading.Event] = None) -> List[int]:
        """Compile the forward and the analyses for every length bucket a text can fall in
        (16, 32, ... up to HEATMAP_MAX_TOKENS tokens), so that the first text of a new
        length redraws as fast as the rest instead of compiling for 1-2 s. ``explore``
        runs this on a background thread (``warm=False`` turns that off); the compiled
        programs are JAX's, shared with every later call. ``stop``: an Event that ends the
        loop before the next bucket (set when the interpreter exits). Returns the buckets."""
        positions = self.model.config.max_positions
        limit = min(HEATMAP_MAX_TOKENS, positions)
        buckets = sorted({bucket_length(n, positions) for n in range(1, limit + 1)})
        for bucket in buckets:
            if stop is not None and stop.is_set():
                break
            text = self._text_in_bucket(bucket, positions)
            if text is not None:
                classify_heads(head_scores(run(self.model, text, capture=CAPTURE)))
        return buckets

    def _text_in_bucket(self, bucket: int, positions: int) -> Optional[str]:
        """The shortest repetition of DEFAULT_TEXT's words whose tokens fall in ``bucket``
        (a binary search: the token count grows with the word count), or None."""
        words = DEFAULT_TEXT.split()

        def text(count: int) -> str:
            return " ".join(words[i % len(words)] for i in range(count))

        def tokens(count: int) -> int:
            return int(np.asarray(tokenize(self.model, text(count), max_length=positions).attention_mask).sum())

        low, high = 1, 4 * bucket
        while low < high:  # the fewest words whose bucket is at least this one
            middle = (low + high) // 2
            if bucket_length(tokens(middle), positions) < bucket:
                low = middle + 1
            else:
                high = middle
        return text(low) if bucket_length(tokens(low), positions) == bucket else None

    # ---- state -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.trace.attention.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.trace.attention.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(np.asarray(self.trace.mask)[0].sum())

    def set_text(self, text) -> bool:
        """Run the model on ``text`` and redraw; refuse (keeping the last view) with a message."""
        if not isinstance(text, str):
            return self._refuse(f"The text must be a string; got {type(text).__name__}.")
        if not text.strip():
            return self._refuse("The text is empty: type a sentence and press Enter.")
        try:
            count = int(np.asarray(tokenize(self.model, text).attention_mask).sum())
        except (ValueError, TypeError) as error:
            return self._refuse(f"This text cannot be run: {error}")
        if count > HEATMAP_MAX_TOKENS:
            return self._refuse(f"The text is {count} tokens; the explorer draws up to {HEATMAP_MAX_TOKENS}. "
                                "Shorten it, or use `attnjax report` (pooled maps) for long inputs.")
        started = time.perf_counter()
        try:
            trace = run(self.model, text, capture=CAPTURE)
            trace.attention.block_until_ready()
        except (ValueError, TypeError) as error:
            return self._refuse(f"The model could not run on this text: {error}")
        ran = time.perf_counter()
        heads = classify_heads(head_scores(trace))
        analysed = time.perf_counter()
        self.text, self.trace, self.heads = text, trace, heads
        self.layer, self.head = min(self.layer, self.num_layers - 1), min(self.head, self.num_heads - 1)
        self.message = ""
        self.timings = {"run": (ran - started) * 1e3, "analyses": (analysed - ran) * 1e3}
        self._redraw(overview=True)
        return True

    def set_layer(self, layer) -> bool:
        """Select a layer (0-based): redraw the heatmap and open its head in the overview."""
        value = self._index(layer, self.num_layers, "layer")
        if value is None:
            return False
        self.layer, self.timings = value, {}
        self._redraw(overview=False)
        return True

    def set_head(self, head) -> bool:
        """Select a head (0-based, within the layer): redraw the heatmap and open it in the overview."""
        value = self._index(head, self.num_heads, "head")
        if value is None:
            return False
        self.head, self.timings = value, {}
        self._redraw(overview=False)
        return True

    def set_scale(self, scale: str) -> bool:
        """Choose the colour scale (one of viz SCALES) and redraw both charts."""
        if scale not in SCALES:
            return self._refuse(f"Unknown colour scale {scale!r}; choose one of {', '.join(SCALES)}.")
        self.scale, self.timings = scale, {}
        self._redraw(overview=True)
        return True

    def on_change(self, callback) -> None:
        """Call ``callback(explorer)`` after every change (the widget redraws through it)."""
        self._on_change.append(callback)

    # ---- data and charts -----------------------------------------------------
    def head_frame(self) -> pd.DataFrame:
        """The selected head's rows of the attention frame (query, key, weight, tokens)."""
        return attention_frame(self.trace, layers=[self.layer], heads=[self.head])

    def heatmap(self) -> alt.Chart:
        """The selected head's heatmap (attnjax.viz.attention_heatmap)."""
        return self._views["heatmap"]

    def overview(self) -> Optional[alt.HConcatChart]:
        """The model overview of the current text, or None (turned off, or over its budget).

        The widget shows the overview's spec (viz.overview.overview_spec) as built; the
        Altair chart around it is made on the first call for each text."""
        spec = self._specs.get("overview")
        if spec is None:
            return None
        if "overview" not in self._views:
            with alt.utils.schemapi.debug_mode(False):
                self._views["overview"] = alt.HConcatChart.from_dict(spec, validate=False)
        return self._views["overview"]

    def summary(self) -> str:
        """One line: tokens, and the selected head's category from classify_heads."""
        row = self.heads[(self.heads["layer"] == self.layer) & (self.heads["head"] == self.head)]
        category = str(row["category"].iloc[0]) if len(row) else "?"
        return (f"{self.num_tokens} tokens · layer {self.layer}, head {self.head}: {category} · "
                f"last update {sum(self.timings.values()):.0f} ms")

    def _redraw(self, overview: bool) -> None:
        started = time.perf_counter()
        with alt.utils.schemapi.debug_mode(False):  # skip per-object validation while building ...
            chart = attention_heatmap(self.head_frame(), scheme=self.scheme, scale=self.scale)
        # ... nor of the spec: its builders' specs are validated by the tests, and a second
        # validation here (as a plain display does) was over half of the overview's redraw
        self._specs["heatmap"] = chart.to_dict(validate=False)
        self._views["heatmap"] = chart
        drawn = time.perf_counter()
        self.timings["heatmap"] = (drawn - started) * 1e3
        for callback in self._on_change:  # the heatmap is on show before the overview is built
            callback(self)
        if overview and self.show_overview:
            self._views.pop("overview", None)
            self._specs["overview"] = self._build_overview()
        elif self._specs.get("overview") is not None:  # the same maps: only the head it opens on changes
            self._views.pop("overview", None)
            self._specs["overview"] = opened_at(self._specs["overview"], self._layer_id(), self.head)
        else:
            return
        self.timings["overview"] = (time.perf_counter() - drawn) * 1e3
        for callback in self._on_change:
            callback(self)

    def _build_overview(self) -> Optional[dict]:
        weights = self.num_layers * self.num_heads * self.num_tokens ** 2
        if weights > OVERVIEW_MAX_WEIGHTS:
            self.message = (f"The overview is left out: {self.num_tokens} tokens is over its budget for this "
                            "model size; the heatmap shows the selected head.")
            return None
        positions, tokens = sequence_tokens(self.trace)
        # To numpy first: a JAX slice with this text's bounds would compile anew for every length.
        attention = np.asarray(self.trace.attention)[:, 0]                     # (L, H, T, T)
        first, count = int(positions[0]), len(positions)
        if np.array_equal(positions, np.arange(first, first + count)):  # one run of tokens: a view
            maps = attention[:, :, first:first + count, first:first + count]   # (L, H, n, n)
        else:
            maps = attention[:, :, positions][:, :, :, positions]              # (L, H, n, n)
        layers = self._layer_ids()
        return overview_spec(maps, layers, range(self.num_heads), tokens, tokens, scores=self.heads,
                             scheme=self.scheme, scale=self.scale, start=(self._layer_id(), self.head))

    def _layer_ids(self) -> list:
        """The model's layer numbers of the trace's layers (all of them unless the capture chose some)."""
        return list(self.trace.layers) or list(range(self.num_layers))

    def _layer_id(self) -> int:
        return int(self._layer_ids()[self.layer])

    def _index(self, value, count: int, name: str) -> Optional[int]:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            self._refuse(f"The {name} must be a whole number from 0 to {count - 1}; got {value!r}.")
            return None
        if not 0 <= int(value) < count:
            self._refuse(f"There is no {name} {int(value)}: the model has {count} {name}s (0 to {count - 1}).")
            return None
        self.message = ""
        return int(value)

    def _refuse(self, message: str) -> bool:
        self.message = message
        for callback in self._on_change:
            callback(self)
        return False

    # ---- the notebook widget ------------------------------------------------
    def widget(self):
        """The ipywidgets view: text box, layer/head/scale selectors, message line, charts."""
        return _ExplorerWidget(self, _widgets()).box

    def _ipython_display_(self):
        from IPython.display import display

        try:
            display(self.widget())
        except ImportError as error:
            print(error)
            display(self.heatmap())
            if self.overview() is not None:
                display(self.overview())


class _ExplorerWidget:
    """Wires ipywidgets controls to an Explorer's methods and redraws its Output areas."""

    def __init__(self, explorer: Explorer, widgets):
        self.explorer = explorer
        self.text = widgets.Text(value=explorer.text, description="text", continuous_update=False,
                                 layout=widgets.Layout(width="720px"))
        self.layer = widgets.Dropdown(options=list(range(explorer.num_layers)), value=explorer.layer,
                                      description="layer", layout=widgets.Layout(width="160px"))
        self.head = widgets.Dropdown(options=list(range(explorer.num_heads)), value=explorer.head,
                                     description="head", layout=widgets.Layout(width="160px"))
        self.scale = widgets.Dropdown(options=list(SCALES), value=explorer.scale, description="scale",
                                      layout=widgets.Layout(width="200px"))
        # A Label shows its value as plain text: the message may quote the user's text.
        self.status = widgets.Label(value=explorer.summary())
        self.message = widgets.Label(value=explorer.message, style={"text_color": "#b00020"})
        self.heatmap_out = widgets.Output()
        self.overview_out = widgets.Output()
        self.text.observe(lambda change: explorer.set_text(change["new"]), names="value")
        self.layer.observe(lambda change: explorer.set_layer(change["new"]), names="value")
        self.head.observe(lambda change: explorer.set_head(change["new"]), names="value")
        self.scale.observe(lambda change: explorer.set_scale(change["new"]), names="value")
        self._shown = {}
        explorer.on_change(self.refresh)
        self.box = widgets.VBox([
            self.text,
            widgets.HBox([self.layer, self.head, self.scale]),
            self.status, self.message,
            self.heatmap_out,
            self.overview_out,
        ])
        self.refresh(explorer)

    def refresh(self, explorer: Explorer) -> None:
        """Show the message and summary; redraw only the charts that changed."""
        from IPython.display import display

        self.message.value = explorer.message
        self.status.value = explorer.summary()
        for name, out in (("heatmap", self.heatmap_out), ("overview", self.overview_out)):
            spec = explorer._specs.get(name)
            if spec is self._shown.get(name):
                continue
            self._shown[name] = spec
            with out:
                out.clear_output(wait=True)
                if spec is not None:  # the spec as built, through the active Altair renderer
                    bundle = alt.renderers.get()(spec)
                    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
                    display(data, metadata=metadata, raw=True)


def explore(model, text: str = DEFAULT_TEXT, *, layer: int = 0, head: int = 0, scheme: str = "viridis",
            scale: str = "linear", overview: bool = True, warm: bool = True) -> Explorer:
    """An interactive attention explorer for ``model`` (from attnjax.load).

    In a notebook the returned Explorer displays as widgets: a text box (Enter
    re-runs the model), layer / head / colour-scale selectors, the selected head's
    heatmap and the model overview. Without ipywidgets it prints how to install it
    (`pip install ipywidgets`) and shows the two charts. text: the first text;
    layer, head: the first head shown; scheme, scale: colours as in
    attnjax.viz.attention_heatmap; overview: False draws only the heatmap; warm: compile
    every length bucket up to 256 tokens on a background thread (Explorer.warm_up), so
    that no later text waits for a compilation.
    """
    return Explorer(model, text, layer=layer, head=head, scheme=scheme, scale=scale, overview=overview,
                    warm=warm)
