# The two front-door commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the declared dependencies change, so a second run is quick.
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: on a box without a GPU this takes the CPU wheel
	# (on this image it lies on disk); never a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) manage.py run_appliance

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) var
