# Two commands for a fresh machine (see README.md):
#   make demo   the full local pipeline on the embedded default problem (mnist_mini)
#   make test   the test suite (what .ci/run calls)
# Both create .venv and install the pinned stack first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUTPUT_DIR ?= output

.PHONY: demo eos-replay test lint format bench clean-venv system-deps slurm-start slurm-stop

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in the same resolve as curvlinops (docs/INSTALL.md): installed
	# separately, curvlinops' dependencies would pull a newer torch with GBs of CUDA wheels.
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# DeepOBS's network files need only torch/numpy/scipy; its declared dependencies pin
	# old plotting packages we never import.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt deepobs
	# torchvision comes in through backpack but cannot load with the CPU torch build.
	$(PY) -m pip uninstall --quiet --yes torchvision
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; installed when we are root with
# apt, otherwise the fmnist_* problems say how to provide it.
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing dataset-fashion-mnist (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist as root);"; \
	    echo "      the fmnist_* problems need it or OBS_DATASETS"; \
	  fi; \
	fi

demo: $(STAMP) system-deps
	@mkdir -p $(OUTPUT_DIR)
	$(VENV)/bin/hessov run problem=mnist_mini OUTPUT_DIR=$(OUTPUT_DIR) > $(OUTPUT_DIR)/.last-demo
	@echo "results in $$(tail -n1 $(OUTPUT_DIR)/.last-demo)"
	@echo "see them with: $(VENV)/bin/hessov summary $$(tail -n1 $(OUTPUT_DIR)/.last-demo)"
	@echo "report: $$(tail -n1 $(OUTPUT_DIR)/.last-demo)/analysis/report.md"

# The edge-of-stability replay experiment (config/experiments/eos_replay.yaml): train, the
# 10 replays x 3 seeds two jobs at a time, then their comparison over the seeds
# (RUN/replays/report.md). ~15 min, 2 cores.
eos-replay: $(STAMP)
	@mkdir -p $(OUTPUT_DIR)
	$(VENV)/bin/hessov train config/experiments/eos_replay.yaml OUTPUT_DIR=$(OUTPUT_DIR) > $(OUTPUT_DIR)/.last-eos
	$(VENV)/bin/hessov replay $$(tail -n1 $(OUTPUT_DIR)/.last-eos) --list | \
	  xargs -P 2 -I{} $(VENV)/bin/hessov replay $$(tail -n1 $(OUTPUT_DIR)/.last-eos) name={} > /dev/null
	$(VENV)/bin/hessov compare $$(tail -n1 $(OUTPUT_DIR)/.last-eos)
	@echo "report: $$(tail -n1 $(OUTPUT_DIR)/.last-eos)/replays/report.md"

# Two processes for the tests that run on this machine alone (each file in one of them, so
# a module's run is made once; the pipeline's jobs use one thread each), then the Slurm
# tests one at a time, as they share the one local cluster; both run, and make fails if
# either did.
test: $(STAMP) system-deps
	@status=0; \
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slurm" || status=$$?; \
	$(PY) -m pytest -q -m slurm || status=$$?; \
	exit $$status

# Benchmarks are scripts, not tests: one run (under 15 minutes on 2 cores) answers the
# benchmark questions and writes bench/RESULTS.md; `$(PY) -m bench --help` for options.
bench: $(STAMP)
	@# PyHessian, a peer compared in question 11, for the bench only (not a dependency).
	@test -d bench/_work/peers/pyhessian || $(PY) -m pip install --quiet --no-deps \
		--target bench/_work/peers pyhessian==0.1
	$(PY) -m bench

# The local single-node Slurm cluster the tests use (root and apt needed).
slurm-start:
	bash slurm/local-cluster.sh start
slurm-stop:
	bash slurm/local-cluster.sh stop

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline skerch_ext analysis tests bench
	$(VENV)/bin/ruff format --check pipeline skerch_ext analysis tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline skerch_ext analysis tests bench

clean-venv:
	rm -rf $(VENV)
