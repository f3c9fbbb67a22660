# The two commands of the README: `make demo` and `make test`. Each sets up
# everything itself on a fresh Debian machine with Python 3.11: a .venv with the
# package and its dev tools, and Fashion-MNIST from Debian's archive.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data tools demo test lint bench clean

setup: $(VENV)/.installed

# pip (not uv/poetry): it takes torch from the local wheels where they exist.
# Debian's python3 lacks ensurepip until python3-venv is installed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found: set MOCOPLUS_FASHION_MNIST_DIR to a folder with its IDX files"; fi

# curl: the service examples of the README and docs/service.md, which tests/test_readme.py runs as written;
# chromium + chromium-driver: tests/test_search_page.py drives the search page in headless Chromium
tools:
	@command -v curl >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq curl chromium chromium-driver; }

demo: setup data
	$(BIN)/mocoplus demo --out demo-out

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers (pytest-xdist): the suite is mostly single-threaded work (subprocess start-ups, Prefect,
# services) that a second worker overlaps; tests/conftest.py splits the cores between them.
TEST_WORKERS ?= 2

test: setup data tools lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(BIN)/python benchmarks/bench_objective.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .hypothesis
