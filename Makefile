# hanabi: every OCI/Docker container in its own microVM.
# `make demo` sets everything up and runs a container in a VM; `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
DEMO_DIR ?= /var/lib/hanabi/demo
DEMO_ID ?= hanabi-demo

.PHONY: setup deps venv guest up down status demo test unit bench clean install uninstall

setup: deps venv guest ## install what is missing: apt packages, the venv, the guest image

deps:
	deploy/local/install-deps

venv: $(BIN)/hanabi-runtime
$(BIN)/hanabi-runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python deploy/local/plain-editable-paths $(VENV)
	touch $@

guest: venv ## build the guest kernel + initramfs (cached: rebuilt only when inputs change)
	$(BIN)/hanabi-image build

up: setup ## start the four daemons in the background and wait until each answers
	deploy/local/hanabi-daemons start

down: ## stop the daemons, remove their sockets and pid files
	deploy/local/hanabi-daemons stop

status:
	deploy/local/hanabi-daemons status

demo: setup ## run busybox `uname -r` in a microVM, next to the host's
	@started=0; deploy/local/hanabi-daemons status >/dev/null 2>&1 || { deploy/local/hanabi-daemons start; started=1; }; \
	rm -rf $(DEMO_DIR)/bundle; $(BIN)/python -m hanabi_runtime.demo_bundle $(DEMO_DIR)/bundle uname -r >/dev/null; \
	$(BIN)/hanabi-runtime delete --force $(DEMO_ID) >/dev/null 2>&1 || true; \
	echo "host kernel:  $$(uname -r)"; \
	printf 'guest kernel: '; $(BIN)/hanabi-runtime run --bundle $(DEMO_DIR)/bundle $(DEMO_ID); rc=$$?; \
	[ $$started = 1 ] && deploy/local/hanabi-daemons stop >/dev/null; exit $$rc

test: venv ## the whole suite, through tox
	$(BIN)/tox -q

unit: venv
	$(BIN)/python -m pytest -q tests/unit

bench: setup ## benchmarks (hanabi vs runc in the same run)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/docker_run.py
	$(BIN)/python bench/blockd.py
	$(BIN)/python bench/network.py
	$(BIN)/python bench/pool.py
	$(BIN)/python bench/templates.py
	$(BIN)/python bench/cli.py
	$(BIN)/python bench/storage.py
	$(BIN)/python bench/security.py
	$(BIN)/python bench/firecracker.py

install: ## systemd hosts: /opt/hanabi (own venv), the units + hanabi.target, /etc/hanabi/hanabi.toml, the Docker runtimes
	deploy/install.sh install

uninstall: ## remove exactly what `make install` put there (and unregister the Docker runtimes)
	deploy/install.sh uninstall

clean:
	rm -rf .tox build *.egg-info
