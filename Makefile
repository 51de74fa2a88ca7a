# xffl-airflow. Quick start on a fresh machine:
#   make demo    sets everything up, then runs the main job on the embedded default
#   make test    sets everything up, then runs every test
# Each target installs only what is missing, so running it again is cheap.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
# The facility-side environment (xffl_tasks with torch, transformers, safetensors; no Airflow).
# The local facilities' users run it, so it must sit where every user can read it: in the
# checkout when the checkout is readable by others, else in /var/tmp.
FACILITY_VENV ?= $(shell if runuser -u nobody -- test -r "$(CURDIR)/pyproject.toml" 2>/dev/null; \
	then echo "$(CURDIR)/.venv-facility"; \
	else echo "/var/tmp/xffl-airflow-facility-$$(echo "$(CURDIR)" | md5sum | cut -c1-10)"; fi)
# The facility environment is built on the system's Python (Debian's python3, 3.11 on
# bookworm), which the facility users can run; a Python under /root would be out of their reach.
FACILITY_BASE_PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=
KEEP ?=
# LORA=1: make demo runs the LoRA campaign (examples/local-lora.yaml) instead; PRIVACY=1 the
# DP-SGD campaign (examples/local-dp.yaml), its table with each facility's epsilon per round.
LORA ?=
PRIVACY ?=
# Packages the local facilities (and the PostgreSQL tests, and the headless-browser test of the
# campaign view: chromium and its chromedriver) need from Debian.
SYSTEM_PACKAGES_STAMP := $(VENV)/.system-packages
export XFFL_FACILITY_PYTHON := $(FACILITY_VENV)/bin/python
export XFFL_EXTRA_SYSTEM_PACKAGES ?= postgresql redis-server chromium chromium-driver
# pip's "Location ... is ignored" notes about local mirrors are noise.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither" >&2)

XFFL_TASKS_SOURCES := $(shell find xffl_tasks -name '*.py' 2>/dev/null)

.PHONY: help setup system-packages demo test test-unit lint lock clean

help:
	@echo "make demo       run the main job on the embedded default (does its own set-up)"
	@echo "make test       run every test (does its own set-up)"
	@echo "make test-unit  run the tests that need no facility, Airflow service or database"
	@echo "make setup      only the set-up: system packages, .venv, the facility environment"
	@echo "make lint       ruff over the whole tree"
	@echo "make lock       regenerate requirements.lock and requirements-facility.lock"
	@echo "make clean      remove the virtualenvs"

setup: system-packages $(VENV)/.installed $(FACILITY_VENV)/.installed

system-packages: $(SYSTEM_PACKAGES_STAMP)

$(SYSTEM_PACKAGES_STAMP): docker/facility/install-packages.sh Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "xffl-airflow needs Python >= 3.11; set PYTHON=python3.11")'
	@docker/facility/install-packages.sh
	@mkdir -p $(VENV) && touch $@

$(VENV)/.installed: requirements.lock pyproject.toml
	@echo "xffl-airflow: installing the Python environment into $(VENV) (from requirements.lock)"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q -r requirements.lock $(PIP_QUIET)
	@$(VENV)/bin/pip install -q --no-deps -e . $(PIP_QUIET)
	@touch $@

$(FACILITY_VENV)/.installed: requirements-facility.lock pyproject.toml $(XFFL_TASKS_SOURCES)
	@echo "xffl-airflow: installing the facility environment into $(FACILITY_VENV) (no Airflow)"
	@test -x $(FACILITY_VENV)/bin/python || $(FACILITY_BASE_PYTHON) -m venv $(FACILITY_VENV)
	@$(FACILITY_VENV)/bin/pip install -q -r requirements-facility.lock $(PIP_QUIET)
	@$(FACILITY_VENV)/bin/pip install -q --no-deps --force-reinstall . $(PIP_QUIET)
	@chmod -R a+rX $(FACILITY_VENV)
	@touch $@

# KEEP=1 keeps Airflow and the facilities running after the campaign, for a look in the UI;
# LORA=1 runs a 3-round LoRA campaign (only adapters move) instead of full fine-tuning.
demo: setup
	XFFL_DEMO_KEEP=$(KEEP) XFFL_DEMO_LORA=$(LORA) XFFL_DEMO_PRIVACY=$(PRIVACY) $(VENV)/bin/python -m xffl_testbed.demo

# The 25 slowest tests are listed at the end, so the live tests' share of the time shows.
test: setup
	$(VENV)/bin/python -m pytest --durations=25 $(PYTEST_ARGS)

# The tests that start nothing (tests/conftest.py marks the others from the fixtures they use);
# without the facility environment, the tests that run it are skipped, saying so.
UNIT_MARKERS := not slurm and not airflow_live and not postgres and not redis and not browser
test-unit: $(VENV)/.installed
	XFFL_TEST_TIER=unit $(VENV)/bin/python -m pytest -m "$(UNIT_MARKERS)" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check .

lock:
	PYTHON=$(PYTHON) scripts/lock.sh

clean:
	rm -rf $(VENV) $(CURDIR)/.venv-facility
