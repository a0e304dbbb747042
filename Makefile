# Quick start:  make demo   (set up, then explain a caption of the embedded toy model)
#               make test   (set up, then run the test suite)
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo test setup setup-test clean lint

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# core install: what `dcam demo` needs
$(VENV)/.core-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# test install: core + torch (CPU, parity references) + OpenCV/scikit-image + TFDS/grain + pytest
$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[torch,vision,data,dev]'
	touch $(VENV)/.core-installed $@

setup: $(VENV)/.core-installed
setup-test: $(VENV)/.test-installed

demo: $(VENV)/.core-installed
	$(VENV)/bin/dcam demo --out_dir=dcam_out --overwrite

test: $(VENV)/.test-installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) dcam_out .pytest_cache
