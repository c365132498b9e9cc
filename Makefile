VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SAMPLE := examples/sample.jsonl
OUT ?= build/sample

.PHONY: run test bench clean

$(VENV)/.installed-run: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(VENV)/bin/sftpack build $(SAMPLE) --out $(OUT) --seq-length 64
	$(VENV)/bin/sftpack inspect $(OUT) --row 0

test: $(VENV)/.installed-dev
	$(PY) -m ruff check src
	$(PY) -m ruff format --check src
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PIP) install -q -c constraints.txt trl datasets  # the TRL baseline only
	$(PY) bench/bench_build.py

clean:
	rm -rf build $(VENV)
