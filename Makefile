# fucina: every target sets itself up first, so each works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fucina-installed

.PHONY: setup browser demo test lint format bench test-interop clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel, so no later dependency pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The web page test drives Debian's Chromium; installed once with apt-get (as root, or through sudo).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

demo: $(STAMP)
	$(BIN)/fucina demo --out runs/demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -m "not interop"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: $(STAMP)
	$(BIN)/python bench/model_speed.py

test-interop: $(STAMP)
	$(BIN)/pip install -q llama-cpp-python
	$(BIN)/python -m pytest -m interop

clean:
	rm -rf $(VENV) runs .pytest_cache
