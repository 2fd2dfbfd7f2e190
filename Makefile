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

.PHONY: install test test-fast demo train-stage1 train-stage2 stage2 bench bench-stage1 bench-stage2 bench-stage2-ceiling bench-stage2-baseline bench-outlines bench-margin-reach bench-stage1-speed bench-pipeline bench-contrast-check bench-ig-steps bench-recentre bench-lesion-families bench-visibility bench-stage1-robustness clean

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

## Train stage 1 (centroids + levels) on DATA (default: a built-in synthetic cohort) -> models/stage1/
train-stage1: $(STAMP)
	$(VENV)/bin/spinepipe train-stage1 $(foreach d,$(DATA),--data $(d)) --out models/stage1 $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(MEMBERS),--members $(MEMBERS))

## Train stage 2 (per-vertebra multitask classifier) on DATA -> models/stage2/  (`make train-stage1 stage2` trains both)
train-stage2: $(STAMP)
	$(VENV)/bin/spinepipe train-stage2 $(if $(DATA),--data $(DATA)) --out models/stage2 $(if $(EPOCHS),--epochs $(EPOCHS))

stage2: train-stage2

## Benchmarks: JSON + markdown under bench/results/ (real-data parts need ../shared/data).
bench: bench-stage1 bench-stage1-robustness bench-stage1-speed bench-stage2 bench-stage2-ceiling bench-stage2-baseline bench-outlines bench-margin-reach bench-pipeline bench-contrast-check bench-ig-steps bench-lesion-families bench-visibility

bench-stage1: $(STAMP)
	$(PY) bench/bench_stage1.py $(BENCH_ARGS)

## Stage 1 on scanner-like perturbations (tilt, orientation, intensity coding, bias, noise, gamma, thick slices) of the
## scans a bench-stage1 fold model never saw (default: fold 4 of work_dirs/bench_stage1; FOLD=K, MODEL=DIR)
bench-stage1-robustness: $(STAMP)
	$(PY) bench/stage1_robustness.py --fold $(or $(FOLD),4) --model $(or $(MODEL),work_dirs/bench_stage1/fold$(or $(FOLD),4)/model)

bench-stage2: $(STAMP)
	$(PY) bench/bench_stage2.py $(BENCH_ARGS)

## What any classifier could do on the semi-synthetic stage-2 data, next to the network (no training).
bench-stage2-ceiling: $(STAMP)
	$(PY) bench/stage2_ceiling.py

## A floor for the network: logistic regression on the body's intensity tails (seconds, no deep learning).
bench-stage2-baseline: $(STAMP)
	$(PY) bench/stage2_baseline.py

## How right the stage-2 reading of the real loose outlines is (no training, real data only).
bench-outlines: $(STAMP)
	$(PY) bench/outline_rules.py

## How often stage 2's margin would reach a neighbouring body (expert masks, no training, real data only).
bench-margin-reach: $(STAMP)
	$(PY) bench/margin_reach.py

## Stage-1 network speed by memory layout (channels-last vs contiguous; random inputs, no data needed).
bench-stage1-speed: $(STAMP)
	$(PY) bench/bench_stage1_speed.py

bench-pipeline: $(STAMP)
	$(PY) bench/bench_pipeline.py $(BENCH_ARGS)

## Stage 2: are scans of a contrast the model was not trained on flagged (contrast_unseen)? (~35 min, real data)
bench-contrast-check: $(STAMP)
	$(PY) bench/contrast_check.py

## Stage 2: Integrated-Gradients steps vs the 64-step evidence share and time (~8 min, real data; MODEL=models/stage2)
bench-ig-steps: $(STAMP)
	$(PY) bench/ig_steps.py --model $(or $(MODEL),models/stage2)

## Stage 2 re-centring: body centroids vs stage 1's, verdicts off vs on (~2 min, real data; needs stage-1 fold
## models that list their training subjects, e.g. from bench-stage1: STAGE1="DIR0 DIR1" STAGE2=DIR [RECENTRE_ARGS=...])
bench-recentre: $(STAMP)
	$(PY) bench/recentre.py --stage1 $(STAGE1) --stage2 $(or $(STAGE2),models/stage2) $(RECENTRE_ARGS)

## Stage 2 on lesion families it was not trained on (~65 min, real data, semi-synthetic): a corner-trained and a
## mixed-family model, 80 epochs each on the first half of each cohort (at 30 epochs the corner-only run stays at
## chance); LF_ARGS adds e.g. --model NAME=DIR or --test-seed 2
bench-lesion-families: $(STAMP)
	$(PY) bench/lesion_families.py --train corner80=corner:80 --train mixed80=corner,endplate,diffuse:80 $(LF_ARGS)

## Stage 2 against lesion visibility: held-out real scans with and without lesions, default vs visibility-floored
## training copies, two training seeds each (four 80-epoch trainings, ~80 min on 2 CPU cores)
bench-visibility: $(STAMP)
	$(PY) bench/visibility.py --train corner=none:80 --train cnr2=2.0:80 --train corner_s1=none:80:1 --train cnr2_s1=2.0:80:1 $(VIS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out
