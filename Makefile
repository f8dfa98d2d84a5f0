# make demo: set up .venv and generate a video with the bundled model.   make test: set up and run the tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean

$(PY):
	$(shell command -v $(PYTHON) >/dev/null 2>&1 && echo $(PYTHON) || echo python3) -m venv $(VENV)

# torch is installed first and pinned: the CPU wheel. A bare `torch` requirement on a machine with no
# torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vidiffuse generate "a large red circle moving right on a black background" -o out/demo.mp4 --seed 0
	$(VENV)/bin/vidiffuse generate --prompts examples/prompts.jsonl --out-dir out/demo-batch

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out runs/cache
