# Two commands on a fresh machine (Python 3.11):
#   make train   set up .venv and run the main job: DDPO on the bundled tiny-shapes model
#   make test    set up .venv and run the test suite and the linter
# Both install into .venv with the CPU torch build pinned by constraints-cpu.txt.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

.PHONY: setup train test demo
setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/diffusion-mdp train --preset tiny-shapes

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15
