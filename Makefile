# Two commands for a fresh clone (README): `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv when it is missing, install the package (only when pyproject.toml changed: torch alone
# is ~6 GB, never reinstalled) and make sure the dataset is there.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.enas4d-installed
P ?=

export PATH := $(CURDIR)/$(BIN):$(PATH)
# DVC keeps per-repo state in a machine-wide site cache (/var/tmp/dvc); a root or CI run would leave it
# owned by root for everyone else, so each checkout keeps its own under .dvc/tmp (git-ignored).
export DVC_SITE_CACHE_DIR ?= $(CURDIR)/.dvc/tmp/site-cache
# OpenMP's waiting policy: its default (spin a little, then sleep) is what the pipeline wants on an idle
# machine; passive waiting made a 2-thread training step 1.7x slower there (494 vs 823 img/s). The tests
# run several processes at once (2-rank gloo, database workers), where spinning threads steal each other's
# cores, so `make test` waits passively. On a busy shared machine use OMP_WAIT_POLICY=PASSIVE for both.
test: export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: repro test install data profile smoke

repro: data
	dvc repro

# One pytest-xdist worker per core (tests run torch on one thread), work stealing, the smoke pipeline first
# (tests/conftest.py): the suite takes about as long as that one test. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# Exit 3 from `check` means Fashion-MNIST is not installed: install Debian's package when we can,
# otherwise `check` has already printed what to do.
data: install
	@$(BIN)/python -m enas4d.data check; rc=$$?; \
	if [ $$rc -eq 3 ] && command -v apt-get >/dev/null && [ "$$(id -u)" -eq 0 ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; } \
	    && $(BIN)/python -m enas4d.data check; \
	elif [ $$rc -eq 3 ]; then \
	  echo "as root: apt-get install dataset-fashion-mnist (or see the options above), then rerun make" >&2; exit 1; \
	else exit $$rc; fi

# A profile runs in a temporary copy of the checkout (its own git repo, so `dvc exp run` works there too):
# the committed default results are never touched. To adopt a profile here: cp profiles/<name>.yaml params.yaml
profile: data
	@test -n "$(P)" || { echo "usage: make profile P=<name>; profiles: $$(ls profiles | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }
	@test -f profiles/$(P).yaml || { echo "no profile profiles/$(P).yaml; profiles: $$(ls profiles | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }
	@dir=$$(mktemp -d "$${TMPDIR:-/tmp}/enas4d-$(P).XXXXXX") && \
	git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$$dir" && \
	cd "$$dir" && rm -f dvc.lock && cp profiles/$(P).yaml params.yaml && \
	git init -q && git add -A && git -c user.name=enas4d -c user.email=enas4d@localhost commit -qm "profile $(P)" && \
	echo "profile $(P) in $$dir (the checkout here is untouched)" && \
	DVC_SITE_CACHE_DIR="$$dir/.dvc/tmp/site-cache" dvc repro && echo "profile $(P) results: $$dir/reports"

smoke:
	@$(MAKE) -s profile P=smoke
