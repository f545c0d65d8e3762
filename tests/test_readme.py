"""Every code block in README.md runs as shown.

The ```python blocks run in order, in one namespace, in a temporary directory (the
files they write land there), as a reader following the README top to bottom would
run them: a later block may use names an earlier block defined (``attnjax``,
``Capture`` and ``model`` from the quick start, ``jax`` and ``jnp`` from "Pure
functions").

Two substitutions are made in the source text, and only these, because the machine
that runs the suite is offline and has 2 CPU cores:

- the hub ids ``"HuggingFaceTB/SmolLM2-135M"`` and ``"Qwen/Qwen2.5-0.5B"``
  (downloading them needs the network) become the path of a tiny random Llama saved
  by tests/tiny_decoders.py (``llama-gqa-llama3``: GQA, llama3 RoPE, a tokenizer that
  adds BOS) with ``max_position_embeddings=256``: the same module and code path as
  SmolLM2 (a llama) and Qwen2.5 (a qwen2 without windows, which differs only in its
  q/k/v biases, tested in tests/test_decoder_parity.py).
- ``max_length=16384`` becomes ``max_length=128``, so the long-context block runs the
  same streaming-statistics path at a length the tiny model holds, in a second.
  ``long_text`` itself is defined in the README block and is not changed.

Each substitution must find its string, so a README edit that drops one fails here
instead of silently running something else. Every line of a ```sh block that starts
with ``attnjax`` must parse with the command line's own parser (nothing is run).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
HUB_IDS = ('"HuggingFaceTB/SmolLM2-135M"', '"Qwen/Qwen2.5-0.5B"')
LONG = "max_length=16384"
SHORT = "max_length=128"


def blocks(language: str) -> list:
    """The README's fenced blocks in this language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    from tests.tiny_decoders import tiny_decoder

    sources = blocks("python")
    assert len(sources) >= 5, "README.md should hold its python examples"
    text = "\n".join(sources)
    assert all(hub_id in text for hub_id in HUB_IDS) and LONG in text, \
        "update the substitutions in tests/test_readme.py"

    model_dir = tmp_path / "tiny-llama"
    tiny_decoder(model_dir, "llama-gqa-llama3", max_position_embeddings=256)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    namespace = {"__name__": "__readme__"}
    for number, source in enumerate(sources):
        for hub_id in HUB_IDS:
            source = source.replace(hub_id, repr(str(model_dir)))
        source = source.replace(LONG, SHORT)
        exec(compile(source, f"README.md[python block {number}]", "exec"), namespace)

    # What the blocks claim, checked on what they made.
    assert namespace["stats"].entropy.shape == (1, 8, 512)                 # the Gemma 2 layer
    assert (work / "long.html").stat().st_size > 10_000


def test_readme_sh_blocks_parse():
    from attnjax import cli

    commands = [shlex.split(line, comments=True)
                for source in blocks("sh") for line in source.splitlines()
                if line.strip().startswith("attnjax")]
    assert len(commands) >= 5, "README.md should show the attnjax command line"
    parser = cli.build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv[1:])
        except SystemExit as error:  # argparse exits on an unknown flag or a missing value
            pytest.fail(f"README command does not parse: {shlex.join(argv)} ({error})")
