# sd35 — the two commands: `make serve` (real model, GPU) and `make test`.
# Every target installs what it needs into .venv first; re-running is quick.

PYTHON   ?= python3
# make containerize: the image tag, the torch wheel index (empty = PyPI's CUDA 13
# build; https://download.pytorch.org/whl/cu128 for CUDA 12 drivers; an index with
# torch alone is enough), and extra options for `bentoml containerize`
# (e.g. CONTAINERIZE_OPTS="--opt network=host").
IMAGE    ?= sd35:latest
TORCH_INDEX_URL ?=
CONTAINERIZE_OPTS ?=
# The classic builder where the docker client has no buildx (BuildKit needs it).
DOCKER_BUILDKIT ?= $(shell docker buildx version >/dev/null 2>&1 && echo 1 || echo 0)
VENV     ?= .venv
HOST     ?= 0.0.0.0
PORT     ?= 8000
DEMO_DIR ?= .cache/tiny-sd3

BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed

export HOST PORT
# Keep BentoML's store and usage tracking out of the user's home.
export BENTOML_DO_NOT_TRACK ?= true

.PHONY: install lock serve demo test bench bench-against bench-fairness browser checkov lint format build containerize container-test \
	container-test-cuda gpu-lock gpu-bundle gpu-bundle-nf4 gpu-rehearsal clean

install: $(STAMP)

# torch goes in first and alone: its pin takes the local CPU wheel on CPU-only
# machines (PyPI's CUDA build elsewhere). Then everything else exactly as locked,
# hash-checked — the same versions the image installs (requirements.lock is a
# subset of requirements-dev.lock); torch is not in the lock (see scripts/lock.sh).
$(STAMP): requirements.txt requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-dev.lock
	$(BIN)/python -m pip check
	touch $@

## lock: regenerate requirements*.lock from requirements.txt and requirements-dev.txt (uv pip compile, hashes)
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep -E '^uv==' requirements-dev.txt)"
	UV=$(BIN)/uv PYTHON=$(BIN)/python scripts/lock.sh

## serve: the real model (MODEL_ID, default stabilityai/stable-diffusion-3.5-large-turbo) on HOST:PORT
serve: install
	$(BIN)/bentoml serve service:SD35 --host "$(HOST)" --port "$(PORT)"

$(DEMO_DIR)/model_index.json: | install
	$(BIN)/python -m sd35.tiny $(DEMO_DIR)

## demo: a tiny random model, offline, on CPU — for trying the API, not for pictures
demo: install $(DEMO_DIR)/model_index.json
	MODEL_ID="$(abspath $(DEMO_DIR))" $(BIN)/bentoml serve service:SD35 --host "$(HOST)" --port "$(PORT)"

## test: the whole suite (no GPU, no network)
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

## build: the Bento (service, sd35/, pinned requirements, Dockerfile) into BentoML's store
build: install
	$(BIN)/bentoml build

## containerize: the GPU image $(IMAGE) from the latest Bento (needs Docker)
# BentoML 1.4.40 re-renders the Dockerfile template in a temporary directory and
# refuses to read it unless that directory lies under the working directory:
# TMPDIR keeps it there.
containerize: build
	mkdir -p build/tmp
	DOCKER_BUILDKIT=$(DOCKER_BUILDKIT) TMPDIR="$(CURDIR)/build/tmp" \
		$(BIN)/bentoml containerize sd35:latest --image-tag "$(IMAGE)" \
		$(if $(TORCH_INDEX_URL),--opt build-arg=TORCH_INDEX_URL=$(TORCH_INDEX_URL)) $(CONTAINERIZE_OPTS)

## container-test: build the image as `make containerize` does (CPU torch, no registry needed) and test it
container-test: install
	scripts/container-test.sh

## container-test-cuda: build the CUDA image as users get it (`make containerize`, PyPI's CUDA 13 torch, ~3 GB
## of wheels) and run it here without a GPU: DEVICE=cpu on the tiny model, and the full-size model refused
container-test-cuda: install
	CONTAINER_TESTS=tests/test_container_cuda.py scripts/container-test.sh -s

## browser: Debian's chromium for the browser tests (root; they are skipped without it)
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

## checkov: checkov in a venv of its own (it pins boto3 and packaging below ours); tests/test_kubernetes.py runs it
CHECKOV_VENV ?= .cache/checkov
checkov: $(CHECKOV_VENV)/bin/checkov

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov==3.3.30

## bench: CPU benchmarks on the tiny model → bench/results/cpu-<date>.md (GPU: see bench/README.md)
bench: install
	$(BIN)/python -m bench.cpu

## bench-against: this tree against another revision (REV=<commit>), both served side by side → bench/results/against-<date>.md
bench-against: install
	@test -n "$(REV)" || { echo "usage: make bench-against REV=<commit, tag or branch>"; exit 2; }
	$(BIN)/python -m bench.against $(REV)

## bench-fairness: one key floods, another sends single images — FIFO vs fair queueing → bench/results/fairness-<date>.md
bench-fairness: install
	$(BIN)/python -m bench.fairness

## gpu-lock: re-resolve bench/gpu/bundle.lock, the wheels the lent GPU machine lacks (uv; needs PyPI)
gpu-lock: install
	$(BIN)/python -m bench.gpu.bundle lock

## gpu-bundle: those wheels (cp312, ≤ 56 MiB) into build/gpu-bundle/, to carry to the GPU machine for bench/gpu/run.sh
gpu-bundle: install
	$(BIN)/python -m bench.gpu.bundle download build/gpu-bundle

## gpu-bundle-nf4: bitsandbytes alone (41 MiB) into build/gpu-bundle-nf4/, for `run.sh --window nf4` on a machine
## that already installed build/gpu-bundle (both together exceed what one call may carry)
gpu-bundle-nf4: install
	$(BIN)/python -m bench.gpu.bundle download build/gpu-bundle-nf4 --only bitsandbytes --budget-mib 60

## gpu-rehearsal: bench/gpu/run.sh, every window, here on the CPU at reduced size in a Python 3.12 venv holding the
## GPU machine's versions → build/gpu-results/rehearsal.json (first run: ~2.7 GB of torch wheels, then cached)
gpu-rehearsal: gpu-bundle
	scripts/gpu-rehearsal.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
