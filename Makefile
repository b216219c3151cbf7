# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PACKAGES := common agent coordinator firmware-bridge

.PHONY: venv test lint typecheck imports pytest demo demo-live clean

venv: $(STAMP)

$(STAMP): requirements/constraints.txt requirements/dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints.txt -r requirements/dev.txt \
		-e common -e 'agent[datasets,historian]' -e coordinator -e 'firmware-bridge[sim]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck imports pytest

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py $(DEMO_ARGS)

# Live mode: each site's agent learns from a simulated plant through the bridge.
demo-live: $(STAMP)
	$(BIN)/python demo/run_live_demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) out

# SecAgg benchmark: fedgate vs Flower's SecAgg+ (bench/secagg/README.md). Its own venv, so that
# flwr and its pins never reach .venv. Options: make bench-secagg BENCH_ARGS=--quick
BENCH_VENV := .venv-bench

.PHONY: bench-secagg
bench-secagg:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	echo '*' > $(BENCH_VENV)/.gitignore
	if [ ! $(BENCH_VENV)/.installed-stamp -nt bench/secagg/requirements.txt ] || \
	   [ ! $(BENCH_VENV)/.installed-stamp -nt common/pyproject.toml ]; then \
		$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" && \
		$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
			-r bench/secagg/requirements.txt && \
		touch $(BENCH_VENV)/.installed-stamp; \
	fi
	$(BENCH_VENV)/bin/python -m bench.secagg.run $(BENCH_ARGS)
