# The README's two commands: `make run` (set up + run the main job) and `make test` (set up + tests).
VENV ?= .venv
ARGS ?=

.PHONY: setup run test lint
setup:
	@bash scripts/setup_env.sh

run: setup
	$(VENV)/bin/dop $(ARGS)

test: setup  # lint (ruff, the import layers) first: a wrong-way import fails CI in seconds
	$(VENV)/bin/ruff check dop tests scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check dop tests scripts
