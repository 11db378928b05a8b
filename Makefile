# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
DATA ?= data/fashion-mnist

# the lowest timm pyproject.toml declares: `make test-floor` runs the whole suite against it (CI does both)
TIMM_FLOOR := $(shell sed -n 's/.*"timm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python

.PHONY: setup fashion-mnist demo test test-floor lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(FLOOR_VENV)/.installed: pyproject.toml
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q -e '.[test]' 'timm==$(TIMM_FLOOR)'
	touch $@

# Debian's dataset-fashion-mnist package (MIT) holds the idx files; without root or apt, torchvision's
# download is tried instead when the demo prepares the data
fashion-mnist:
	@test -d $(FMNIST_SRC) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "note: could not install dataset-fashion-mnist; tests on real images will be skipped"; }

demo: setup fashion-mnist
	HF_HUB_OFFLINE=1 $(PY) -m vanillakd demo --data $(DATA)

# lint and import order first (ruff, configured in pyproject.toml), then the suite
test: setup fashion-mnist
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

test-floor: $(FLOOR_VENV)/.installed fashion-mnist
	@$(FLOOR_PY) -c "import timm; assert timm.__version__ == '$(TIMM_FLOOR)', timm.__version__"
	HF_HUB_OFFLINE=1 $(FLOOR_PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m vanillakd bench --threads 1 --json benchmarks/results/bench_cpu.json

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs output
