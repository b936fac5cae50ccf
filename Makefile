# The two commands of the README: `make demo` and `make test`.
# Both create .venv if missing and install the pinned stack (constraints.txt) once;
# the stamp file is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.evalsuite-installed
DEMO_DATA ?= data/demo
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
# one pytest-xdist worker per core (each test process runs torch on one thread); an idle worker takes
# the tests still queued behind a long one on the other (worksteal)
PYTEST_WORKERS ?= auto
DEMO_ARGS ?=

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The whole plan (data -> pretraining -> every task -> leaderboard); re-running resumes.
demo: $(STAMP)
	$(BIN)/evalsuite demo --data-root $(DEMO_DATA) --out $(DEMO_OUT) $(DEMO_ARGS)

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: $(STAMP)
	@OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check evalsuite pretrain tasks leaderboard tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf runs data/demo .pytest_cache
