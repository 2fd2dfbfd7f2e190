# spinepipe — every target installs what it needs into ./.venv first (offline-friendly: pip only).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?=
OUT    ?= demo_out
export PYTHONHASHSEED := 0
# Two cores on the reference machines: keep torch from oversubscribing.
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-fast demo train-stage1 train-stage2 stage2 bench bench-stage1 bench-stage2 bench-pipeline clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>/dev/null || true
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

## Run the whole test suite (fast tests + marked slow/real-data checks; real-data ones skip without ../shared/data).
test: $(STAMP)
	$(PY) -m pytest -q -ra

## Fast tests only.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

## Main job on the built-in synthetic demo data.
demo: $(STAMP)
	$(PY) -m pipeline.demo --out $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out
