# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
# Pinned so every machine tests the same build; on a CUDA machine pip picks the CUDA wheel. Unquoted, so that
# TORCH can carry pip options such as --index-url.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APP_STAMP := $(VENV)/.installed-app
# A second `make demo` continues (a no-op once finished) instead of refusing to replace a checkpoint.
resume = $(if $(wildcard $(1)/ckpt.pt),--init_from=resume)

.PHONY: demo test lint app bench-gpu clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

# prepare.py and train.py with no arguments run the embedded demo (see README); out/grader is the text-image
# scorer that grades R-precision. Each picture is the best of 4 by the GPT's own likelihood.
demo: $(STAMP)
	$(BIN)/python prepare.py
	$(BIN)/python train.py $(call resume,out)
	$(BIN)/python train.py config/scorer_demo.py $(call resume,out/grader)
	$(BIN)/python generate.py --candidates 4 --grid preview.png > T2I_test.tsv
	$(BIN)/python evaluate.py --demo --candidates 4 > demo_scores.json

$(APP_STAMP): $(STAMP) requirements-app.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-app.txt
	touch $@

# The web page for out/best.pt on http://127.0.0.1:7860 (make demo first); app.py's flags go in ARGS.
app: $(APP_STAMP)
	$(BIN)/python app.py $(ARGS)

# Every GPU figure in one call, for a GPU machine whose Python already has torch: no venv, nothing installed.
bench-gpu:
	$(PYTHON) bench.py gpu --out bench_gpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
