"""Open a written page in headless Chromium, offline, and report what it drew.

Used by the tests (and handy in CI scripts) to check that an exported page
renders with no network: Chromium runs with --headless --no-sandbox, a fresh
profile, every host name resolving to nothing, and dumps the DOM after the
page's scripts have settled (virtual time).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Union

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian/Ubuntu) or set ATTNJAX_CHROMIUM=/path/to/chrome"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
)


def find_chromium() -> Optional[str]:
    """Path of a Chromium/Chrome binary, or None ($ATTNJAX_CHROMIUM first)."""
    explicit = os.environ.get("ATTNJAX_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclasses.dataclass(frozen=True)
class Rendered:
    """What the page looked like after its scripts ran."""

    dom: str               # the serialised DOM
    title: str             # document.title at the end
    charts_drawn: int      # charts vega-embed finished (data-attnjax-rendered), -1 if never set
    chart_errors: int      # charts that failed (data-attnjax-errors), -1 if never set
    svg_count: int         # <svg class="marks"> elements Vega drew
    canvas_count: int      # <canvas> elements Vega drew

    @property
    def drew(self) -> bool:
        return self.charts_drawn > 0 and self.chart_errors == 0 and (self.svg_count + self.canvas_count) > 0


def render(path: Union[str, os.PathLike], *, budget_ms: int = 20000, timeout_s: float = 120.0,
           chromium: Optional[str] = None) -> Rendered:
    """Load ``path`` in headless Chromium and return the DOM it ends with."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"No Chromium found; {INSTALL_HINT}.")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="attnjax-chromium-") as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    dom = result.stdout
    if result.returncode != 0 and not dom:
        raise RuntimeError(f"Chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    return Rendered(
        dom=dom,
        title=_first(r"<title>(.*?)</title>", dom, default=""),
        charts_drawn=int(_first(r'data-attnjax-rendered="(\d+)"', dom, default="-1")),
        chart_errors=int(_first(r'data-attnjax-errors="(\d+)"', dom, default="-1")),
        svg_count=len(re.findall(r'<svg[^>]*class="marks"', dom)),
        canvas_count=len(re.findall(r"<canvas\b", dom)),
    )


def _first(pattern: str, text: str, default: str) -> str:
    match = re.search(pattern, text, flags=re.S)
    return match.group(1) if match else default
