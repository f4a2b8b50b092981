# Two commands on a fresh machine (Python 3.11):
#   make train   set up .venv and run the main job: DDPO-IS on the bundled tiny-shapes model's counting task
#   make test    set up .venv and run the linter, the type checker, the layer check and the test suite
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
	$(VENV)/bin/diffusion-mdp train --preset tiny-shapes-counting

# import-linter reads packages from the file tree, where agents/ and envs/ sit beside diffusion_mdp/: the
# layer check runs on a copy laid out as installed (diffusion_mdp/agents, diffusion_mdp/envs).
LAYERS := $(VENV)/layer-check

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	rm -rf $(LAYERS) && mkdir -p $(LAYERS) && cp -r diffusion_mdp $(LAYERS)/ \
		&& cp -r agents $(LAYERS)/diffusion_mdp/agents && cp -r envs $(LAYERS)/diffusion_mdp/envs
	cd $(LAYERS) && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports --config $(CURDIR)/pyproject.toml
	$(PY) -m pytest -q -rs --durations=15
