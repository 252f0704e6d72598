# Set-up and entry points. `make demo` and `make test` create .venv and install pinned versions on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
# pytest workers; torch threads per worker are set in tests/conftest.py
JOBS   ?= 2

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# BLINDSPOT_MALLOC=keep: glibc keeps freed memory for reuse (faster attacks, more memory; blindspot.cli.keep_freed_memory)
demo: $(STAMP)
	BLINDSPOT_MALLOC=keep $(VENV)/bin/blindspot demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info .pytest_cache
