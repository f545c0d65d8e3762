"""benchmarks/gpu_model_check.py (gpu_check.sh's whole-model step) runs, on CPU at small sizes.

On a GPU it compares the Pallas path with the XLA blockwise one inside a decoder; here
both are the blockwise kernel, so every difference must be exactly 0 and the script
must say "ok". This keeps the script working between the sessions that have a GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_model_check.py"


def test_the_model_check_runs_and_passes_on_cpu():
    result = subprocess.run([sys.executable, str(SCRIPT), "--length", "200", "--prompt", "64", "--layers", "1",
                             "--allow-cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "model check: ok" in result.stdout
    assert "max |difference| 0.00e+00" in result.stdout  # one kernel on both sides here
    assert "8/8 ids are a full forward's argmax" in result.stdout


def test_without_a_gpu_it_refuses_unless_asked():
    result = subprocess.run([sys.executable, str(SCRIPT), "--length", "32", "--prompt", "8", "--layers", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "no GPU here" in result.stdout
