# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
DATA ?= data/fashion-mnist

.PHONY: setup fashion-mnist demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Debian's dataset-fashion-mnist package (MIT) holds the idx files; without root or apt, torchvision's
# download is tried instead when the demo prepares the data
fashion-mnist:
	@test -d $(FMNIST_SRC) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "note: could not install dataset-fashion-mnist; tests on real images will be skipped"; }

demo: setup fashion-mnist
	HF_HUB_OFFLINE=1 $(PY) -m vanillakd demo --data $(DATA)

test: setup fashion-mnist
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m vanillakd bench --threads 1 --json benchmarks/results/bench_cpu.json

clean:
	rm -rf $(VENV) runs output
