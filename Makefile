# The two set-up commands of the README. Both create .venv when it is missing and are idempotent:
# the install step is skipped while pyproject.toml is older than the stamp it leaves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?= -m "not slow" -q

.PHONY: demo test test-all install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pyro-vae train --data digits --z-dim 8 --likelihood continuous-bernoulli \
	    --elbo meanfield --epochs 100 --batch-size 64 --lr 3e-3 --seed 0 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
