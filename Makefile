# The two set-up commands of the README. Both create .venv when it is missing and are idempotent:
# the install step (the package with its test and docs extras) is skipped while pyproject.toml is older than the
# stamp it leaves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?= -m "not slow" -q

.PHONY: demo test test-all test-matrix install docs lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $@

install: $(VENV)/.installed

# make demo trains the seeded demo run into runs/demo, replacing an earlier one (--overwrite): rerunning it gives
# the same run.
demo: $(VENV)/.installed
	$(VENV)/bin/pyro-vae train --data digits --z-dim 8 --likelihood continuous-bernoulli \
	    --elbo meanfield --epochs 100 --batch-size 64 --lr 3e-3 --seed 0 --out runs/demo --overwrite

# make test also runs the static checks (make lint) and builds the documentation strictly: a lint or type error,
# or a docstring or page the site cannot render, fails it.
test: $(VENV)/.installed lint
	$(MAKE) --no-print-directory docs
	$(PY) -m pytest $(PYTEST_ARGS)

# The static checks, configured in pyproject.toml at the versions its test extra pins: ruff (pyflakes, pycodestyle,
# import order, bugbear, pyupgrade) on the code, tests, examples and benchmarks; mypy on the package.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pyro_vae tests examples benchmarks
	$(VENV)/bin/mypy

# The documentation site (MkDocs, API reference from the docstrings) into site/; --strict turns every warning
# (a broken link, a module the reference names that does not exist, a docstring it cannot parse) into a failure.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

# The fast suite on every supported Python, each in its own venv .venv-matrix/pyX.Y, created and installed
# like .venv (again only when pyproject.toml is newer than its stamp); then one table of the versions pip
# picked and the results. Interpreters: pyenv's newest X.Y.*, else pythonX.Y on PATH. Not run by `make test`.
MATRIX_PYTHONS  ?= 3.10 3.11 3.12 3.13
MATRIX_PIP_ARGS ?=
MATRIX          := .venv-matrix
MATRIX_ROW      := import importlib.metadata as m, platform, sys, xml.etree.ElementTree as et; \
	r = et.parse(sys.argv[1]).getroot(); s = r if r.tag == "testsuite" else r[0]; \
	n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped")); \
	v = [platform.python_version()] + [m.version(d) for d in ("torch", "pyro-ppl", "arviz")]; \
	print("| " + " | ".join(v + [str(n - f - e - k), str(f + e), str(k)]) + " |")

$(MATRIX)/py%/.installed: pyproject.toml
	@py=$$(ls -d "$$(pyenv root 2>/dev/null)"/versions/$*.*/bin/python 2>/dev/null | sort -V | tail -1); \
	[ -n "$$py" ] || py=$$(command -v python$*); \
	"$$py" -c "" 2>/dev/null || { echo "test-matrix: no Python $* found (pyenv install $*, or set MATRIX_PYTHONS)" >&2; exit 1; }; \
	[ -x $(@D)/bin/python ] || "$$py" -m venv $(@D)
	$(@D)/bin/python -m pip install -q --upgrade pip
	$(@D)/bin/python -m pip install -q $(MATRIX_PIP_ARGS) -e '.[test]'
	touch $@

test-matrix: $(MATRIX_PYTHONS:%=$(MATRIX)/py%/.installed)
	@status=0; for v in $(MATRIX_PYTHONS); do \
	    echo "== Python $$v"; \
	    $(MATRIX)/py$$v/bin/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider \
	        --junitxml=$(MATRIX)/py$$v/junit.xml || status=1; \
	done; \
	echo "| python | torch | pyro-ppl | arviz | passed | failed | skipped |"; \
	echo "|---|---|---|---|---|---|---|"; \
	for v in $(MATRIX_PYTHONS); do \
	    $(MATRIX)/py$$v/bin/python -c '$(MATRIX_ROW)' $(MATRIX)/py$$v/junit.xml || status=1; \
	done; \
	exit $$status

clean:
	rm -rf runs .pytest_cache site
