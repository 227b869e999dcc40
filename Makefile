# `make train` and `make test` set everything up themselves (.venv) and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# In this workplace a verified MNIST lies beside the checkout; elsewhere daae downloads it.
SHARED_MNIST := $(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz)
DATA_ROOT ?= $(if $(SHARED_MNIST),$(abspath ../shared/data/mnist),)
TRAIN_ARGS ?=

.PHONY: setup train test clean

$(BIN)/daae: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[tune,test]'
	touch $@

setup: $(BIN)/daae

train: setup
	$(BIN)/daae train --config configs/mnist.yaml $(if $(DATA_ROOT),data.root=$(DATA_ROOT),) $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
