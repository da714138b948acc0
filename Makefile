# Deep Learning at Scale: two commands.
#   make lab   set up .venv, build labs/ from solutions/, open JupyterLab on labs/
#   make test  set up .venv, run every test (library, MPI, notebooks, browser)
# Both are idempotent: the environment is reinstalled only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 8888
IP     ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: lab test setup labs check-labs browser cluster-tools test-container solutions clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.10 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[mpich,test]"
	touch $@

setup: $(STAMP)

labs: $(STAMP)
	$(BIN)/workshop build-labs

lab: labs
	@echo "Starting JupyterLab on labs/ (Ctrl-C to stop); open the URL with its token below."
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter lab --ServerApp.root_dir=labs --ServerApp.ip=$(IP) --ServerApp.port=$(PORT) \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root)

# Headless Chromium for the browser smoke test: installed on Debian/Ubuntu when we are root,
# otherwise that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Debian's chromium for the browser test..."; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the browser test will skip"; \
	fi

# Debian's Slurm and munge for the real-Slurm test (tests/test_slurm.py), installed the same way when we are
# root on Debian/Ubuntu; elsewhere that test skips and says why.
cluster-tools:
	@if ! command -v slurmctld >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Debian's slurm-wlm and munge for the Slurm test..."; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
			|| echo "slurm-wlm could not be installed: the Slurm test will skip"; \
	fi

test: $(STAMP) browser cluster-tools
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# Build the Docker image with the engine this machine has and check it (not part of `make test`: 5-15 minutes).
test-container:
	bash cluster/container_check.sh

check-labs: $(STAMP)
	$(BIN)/workshop build-labs --check

# Re-execute the solution notebooks in place so solutions/ carries fresh outputs; the figures they record go to
# docs/expected_figures/<this CPU>.json, from which the instructor guide's expected-figures table is generated.
solutions: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" WORKSHOP_RESULTS="$$($(BIN)/python -c 'from workshop_lib import expected; print(expected.figures_file())')" \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 solutions/*.ipynb
	$(BIN)/workshop build-labs
	$(BIN)/workshop report --expected

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
