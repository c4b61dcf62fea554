# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install check test demo stack bench bench-quick soak clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The fast tier: lint and every test that needs no service (references, crypto, events, resolve, notices, fuzz).
check: $(STAMP)
	$(VENV)/bin/ruff check keychain streams devtools tests bench
	FAST_TESTS=1 $(PY) -m pytest -m "not services" -q $(PYTEST_ARGS)

# Everything but the benchmarks (`make bench`, `make bench-quick`).
test: $(STAMP)
	$(VENV)/bin/ruff check keychain streams devtools tests bench
	$(PY) -m pytest -m "not bench" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m devtools demo

bench: $(STAMP)
	for b in hit_latency warm invalidate sweep replicas scale; do $(PY) -m bench.$$b; done

# The fault soak with its checker (bench/soak.py): 10 minutes; SOAK_ARGS=--quick for 90 s.
soak: $(STAMP)
	$(PY) -m bench.soak $(SOAK_ARGS)

# Each benchmark in its quick mode, as a test that it still runs and reports its figures (not its speed).
bench-quick: $(STAMP)
	$(PY) -m pytest -m bench $(PYTEST_ARGS)

# The local services in the background; only `export` lines on stdout: `source <(make -s stack)`, then
# `kill $$LOCAL_STACK_PID` stops them.
stack: $(STAMP)
	@$(PY) -m devtools stack --detach

clean:
	rm -rf $(VENV) .pytest_cache
