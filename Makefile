# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
# Pinned so every machine tests the same build; on a CUDA machine pip picks the CUDA wheel. Unquoted, so that
# TORCH can carry pip options such as --index-url.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

# prepare.py, train.py and generate.py with no arguments run the embedded demo (see README). A second
# `make demo` resumes training (a no-op once it has finished) instead of refusing to replace out/ckpt.pt.
demo: $(STAMP)
	$(BIN)/python prepare.py
	$(BIN)/python train.py $(if $(wildcard out/ckpt.pt),--init_from resume)
	$(BIN)/python generate.py --grid preview.png > T2I_test.tsv
	$(BIN)/python evaluate.py --demo > demo_scores.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
