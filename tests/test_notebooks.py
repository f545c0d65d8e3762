"""The notebooks run top to bottom on CPU (their `!pip` / `%` lines are Colab setup).

Each notebook runs with small sizes: the long-context one on a tiny random Llama
(built with transformers, with a tokenizer) at 160 tokens instead of SmolLM2 at 16k.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# What each notebook must write (a self-contained page of more than 10 kB each).
WRITES = {
    "quickstart.ipynb": ("taxonomy.html",),
    "long_context.ipynb": ("long_context_heads.html", "long_context_overview.html"),
    "corpus_profile.ipynb": ("corpus_profile.html",),
    "generation.ipynb": ("generation_view.html", "generation_spans.html"),
    "inside_a_head.ipynb": ("head_view.html", "steps.html", "qk_map.html", "structure.html"),
    "custom_attention_lab.ipynb": ("lab_training.html",),
}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def code_cells(path: Path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines = [line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))]
            yield "".join(lines)


def small_sizes(name: str, directory: Path, monkeypatch) -> None:
    """Point a notebook at a model and length the CPU runs in seconds."""
    if name == "long_context.ipynb":
        from tests.tiny_decoders import tiny_decoder

        model_dir = directory / "tiny-llama"
        tiny_decoder(model_dir, "llama-gqa-llama3", max_position_embeddings=256)
        monkeypatch.setenv("ATTNJAX_MODEL", str(model_dir))
        monkeypatch.setenv("ATTNJAX_LENGTH", "160")
    if name == "corpus_profile.ipynb":
        monkeypatch.setenv("ATTNJAX_CORPUS_SIZE", "24")
        monkeypatch.setenv("ATTNJAX_SENTENCES", "1")  # one length bucket: one compile
    if name == "generation.ipynb":  # a tiny Llama with a chat template, 8 new tokens
        from tests.tiny_decoders import tiny_decoder

        model_dir = directory / "tiny-chat-llama"
        tiny_decoder(model_dir, "llama-gqa-llama3", max_position_embeddings=256)
        (model_dir / "chat_template.jinja").write_text(CHATML)
        monkeypatch.setenv("ATTNJAX_MODEL", str(model_dir))
        monkeypatch.setenv("ATTNJAX_NEW_TOKENS", "8")
    if name == "custom_attention_lab.ipynb":
        monkeypatch.setenv("ATTNJAX_LAB_STEPS", "20")  # the recipe's model, 20 steps instead of 2000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the notebook writes land here
    small_sizes(path.name, tmp_path, monkeypatch)
    namespace = {"__name__": "__notebook__"}
    for number, source in enumerate(code_cells(path)):
        exec(compile(source, f"{path.name}[cell {number}]", "exec"), namespace)
    for written in WRITES[path.name]:
        assert (tmp_path / written).stat().st_size > 10_000, written


def test_every_notebook_is_checked():
    assert NOTEBOOKS, "notebooks/ should hold the quick-start notebook"
    assert {p.name for p in NOTEBOOKS} == set(WRITES), "list what each notebook writes in WRITES"
