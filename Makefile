# The two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench gpu-check install constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dali,test,dicom]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raysemi demo --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Every test without Ray, a cluster or a Ray Train run (a few minutes); CI runs the full `make test`.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	RAYSEMI_TEST_TIER=fast $(BIN)/python -m pytest -m "not ray and not slow and not multinode" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/pseudolabel.py

# Every GPU path run and measured, one JSON (bench/results/gpu_check.json); without CUDA a CPU dry run
# (bench/results/gpu_check-dry.json). Exits non-zero when a section fails.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

constraints: $(STAMP)
	(echo "# Exact versions that 'make' and CI install (pip -c constraints.txt). Regenerate with 'make constraints'."; \
	 $(BIN)/python -m pip freeze --exclude-editable | grep -v '^raysemi') > constraints.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
