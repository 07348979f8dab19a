# Every target creates .venv if missing and installs racedit with the pinned constraints,
# so on a fresh clone `make demo` and `make test` are the whole set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean gpu-wheels gpu-check

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
	rm -rf $(VENV) runs .cache .gpu

# The GPU run (README "On a GPU"): gpu-wheels here, where a registry is reachable; gpu-check on the GPU machine,
# offline (bench/gpu_check.sh: a venv over the system's torch, the wheels, racedit, then bench/gpu_check.py).
GPU_WHEELS := .gpu/wheels

gpu-wheels: $(GPU_WHEELS)/.complete

$(GPU_WHEELS)/.complete: constraints.txt bench/gpu_check.sh
	PYTHON=$(PY) bench/gpu_check.sh --wheels $(GPU_WHEELS)
	touch $@

gpu-check:
	bench/gpu_check.sh $(GPU_CHECK_ARGS)
