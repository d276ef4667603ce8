# Set-up is part of every target: a fresh clone needs only `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check vconvert tests benchmarks sample_models docs
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/vconvert demo --workdir demo-output

lint: $(STAMP)
	$(BIN)/ruff check vconvert tests benchmarks sample_models docs
	$(BIN)/ruff format --check vconvert tests benchmarks sample_models docs

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
