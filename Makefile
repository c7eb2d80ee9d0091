# bt_fast runbook. `make train` and `make test` set everything up on a fresh machine.
#   make train                       Fashion-MNIST on this machine (GPU if present), then kNN
#   make train CONFIG=configs/imagenet.yaml GPUS=8
#   make test                        the CPU test suite (make test-fast: the quick part)
#   make bench                       side-by-side benchmarks (JSON)
#   make eval CHECKPOINT=runs/fmnist/checkpoints/last.pt
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BT := $(BIN)/bt-fast
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
# nvidia-dali-cuda130 on CUDA 13 stacks; the CPU pipelines run with either.
DALI_PKG ?= nvidia-dali-cuda120
STAMP := $(VENV)/.bt-fast-setup
DEB_PKGS := dataset-fashion-mnist prometheus

CONFIG ?= configs/fmnist.yaml
FMNIST_DIR ?= data/fashion-mnist
# The run folder: SET=train.run_dir=... wins over the config's train.run_dir.
RUN_DIR ?= $(or $(patsubst train.run_dir=%,%,$(filter train.run_dir=%,$(SET))),$(shell sed -n 's/^  run_dir: *//p' $(CONFIG) 2>/dev/null | head -1))
CHECKPOINT ?= $(RUN_DIR)/checkpoints/last.pt
SET ?=

.PHONY: setup train test test-fast bench doctor eval lint data clean-runs docker-build docker-config docker-down
.DEFAULT_GOAL := train

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	@echo "== setup: virtualenv $(VENV) with torch, DALI and test tools"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PKGS) $(DALI_PKG) -r requirements.txt
	$(BIN)/pip install -q -e . --no-deps
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "== setup: Debian packages $(DEB_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PKGS) >/dev/null; \
	else echo "== setup: not root; install the Debian packages $(DEB_PKGS) yourself for Fashion-MNIST and the Prometheus tests"; fi
	touch $@

data: setup
	$(BT) data fashion-mnist --out $(FMNIST_DIR)

# Launch: NODES x GPUS processes, one torchrun command line (scripts/train.sh) everywhere.
#   make train NODES=4 GPUS=8 CONFIG=...   Docker (default once NODES is given): generated
#                                          compose file, 4 trainer services + dashboards
#   make train NODES=4 GPUS=8 LAUNCHER=torchrun RDZV_HOST=node0   run on each of the 4 nodes
#   make train NODES=2 GPUS=8 NETWORK=host NODE=k RDZV_HOST=...   Docker, one machine per node
NODES ?= 1
GPUS ?= 1
LAUNCHER ?= $(if $(filter command line environment,$(origin NODES)),docker,local)
RDZV_HOST ?=
MAX_RESTARTS ?= 3
IMAGE ?= bt-fast:latest
NETWORK ?= bridge
NODE ?=
COMPOSE_DIR ?= build/docker
COMPOSE = docker compose -f $(COMPOSE_DIR)/compose.yaml
TRAINERS = $(if $(NODE),node$(NODE),$(addprefix node,$(shell seq 0 $$(($(NODES) - 1)))))
TORCHRUN_ENV = NODES=$(NODES) GPUS=$(GPUS) CONFIG=$(CONFIG) RDZV_HOST=$(RDZV_HOST) \
	MAX_RESTARTS=$(MAX_RESTARTS) TORCHRUN=$(BIN)/torchrun

train: setup
ifeq ($(LAUNCHER),docker)
	$(BIN)/python -m bt_fast.launch --nodes $(NODES) --gpus $(GPUS) --config $(CONFIG) \
	  --image $(IMAGE) --network $(NETWORK) --max-restarts $(MAX_RESTARTS) --out $(COMPOSE_DIR) \
	  $(if $(RDZV_HOST),--rdzv-host $(RDZV_HOST)) $(foreach s,$(SET),--set $(s))
	BT_UID=$$(id -u) BT_GID=$$(id -g) $(COMPOSE) build $(firstword $(TRAINERS))
	$(COMPOSE) up --detach $(if $(NODE),node$(NODE) dcgm$(NODE))
	$(COMPOSE) wait $(TRAINERS)
else ifeq ($(LAUNCHER),torchrun)
	$(TORCHRUN_ENV) scripts/train.sh $(foreach s,$(SET),--set $(s))
else
	@if grep -q "$(FMNIST_DIR)" $(CONFIG); then $(BT) data fashion-mnist --out $(FMNIST_DIR); fi
	$(if $(filter 1,$(GPUS)),$(BT) train --config $(CONFIG),$(TORCHRUN_ENV) scripts/train.sh) $(foreach s,$(SET),--set $(s))
	@echo "== kNN accuracy on the val split: pretrained backbone, same backbone at random init, raw pixels"
	$(BT) eval knn --checkpoint $(CHECKPOINT)
	$(BT) eval knn --checkpoint $(CHECKPOINT) --random-init
	$(BT) eval knn --checkpoint $(CHECKPOINT) --pixels
endif

docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE) --build-arg UID=$$(id -u) --build-arg GID=$$(id -g) .

docker-config:
	$(BIN)/python -m bt_fast.launch --nodes $(NODES) --gpus $(GPUS) --config $(CONFIG) --out $(COMPOSE_DIR)
	$(COMPOSE) config --quiet

docker-down:
	$(COMPOSE) down

# make test: everything (what CI runs). make test-fast: no training, no spawned processes,
# no Triton interpreter (the `slow` marker): the quick loop while editing.
test: setup
	$(BIN)/pytest -q tests

test-fast: setup
	$(BIN)/pytest -q -m "not slow" tests

bench: setup
	$(BT) bench step --json
	$(BT) bench loss --json
	$(BT) bench pipeline --json

# Will this node train correctly, and how fast? (docs/gpu.md) DOCTOR="--quick --json" for the short run.
DOCTOR ?=
doctor: setup
	$(BT) doctor $(DOCTOR)

# Every protocol next to the same backbone at random init (kNN and linear share cached features).
eval: setup
	$(BT) eval knn --checkpoint $(CHECKPOINT)
	$(BT) eval knn --checkpoint $(CHECKPOINT) --random-init
	$(BT) eval linear --checkpoint $(CHECKPOINT)
	$(BT) eval linear --checkpoint $(CHECKPOINT) --random-init
	$(BT) eval semi --percent 10 --checkpoint $(CHECKPOINT)
	$(BT) eval semi --percent 10 --checkpoint $(CHECKPOINT) --random-init

lint: setup
	$(BIN)/hadolint docker/Dockerfile

clean-runs:
	rm -rf runs/
