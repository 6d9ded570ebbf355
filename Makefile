# One-command set-up. `make quickstart` and `make test` create .venv if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: venv quickstart test clean

$(BIN)/medcl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/medcl

venv: $(BIN)/medcl

quickstart: venv
	$(BIN)/medcl run pipelines/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
