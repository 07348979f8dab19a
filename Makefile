# Every target creates .venv if missing and installs racedit with the pinned constraints,
# so on a fresh clone `make demo` and `make test` are the whole set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/racedit train --config configs/demo.yaml --resume

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check racedit tests bench eval train.py sample.py

bench: $(STAMP)
	$(BIN)/python bench/moe_step.py --connections
	$(BIN)/python bench/memory_step.py
	$(BIN)/python bench/comm_scaling.py
	$(BIN)/python bench/latents.py
	$(BIN)/python bench/verify.py

clean:
	rm -rf $(VENV) runs .cache
