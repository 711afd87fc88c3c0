# `make train`: set up .venv if needed, then train RetinaNet on the built-in shapes data (CPU-sized).
# `make gpu-check`: on a CUDA machine, with the Python whose torch sees the GPU (PYTHON=..., not .venv's): one report
# of the CUDA tests, training speed against torchvision, host syncs and loader workers (bench/gpu_check.py).
# `make test`: set up, then check the code with ruff (lint and format) and run the test suite, one pytest-xdist
# worker a core (at most 4: each holds torch and a preloaded interpreter, ~2 GB), the cores shared among them
# (tests/conftest.py).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py experiment=retinanet_shapes $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

gpu-check:
	$(PYTHON) -m bench.gpu_check $(ARGS)

clean:
	rm -rf runs .pytest_cache
