# signerd: set-up, run, test, benchmark.
#   make run    install what is missing, make a dev SoftHSM token under var/, run signerd in the foreground
#   make test   install what is missing and run the whole suite against real SoftHSM and OpenBao
#   make bench  the benchmark harness (make bench BENCH_ARGS=--quick for a short run)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SOFTHSM2_CONF := $(VAR)/softhsm/softhsm2.conf

.PHONY: run test bench check system deps dev-token clean

system:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v ssh-agent >/dev/null || missing="$$missing openssh-client"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	pkg-config --exists libsystemd 2>/dev/null || missing="$$missing libsystemd-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[pkcs11,vault,systemd,redis,test,bench]'
	touch $@

deps: system $(VENV)/.installed

dev-token: deps
	@mkdir -p $(VAR)/run $(VAR)/log
	@softhsm/make-token.sh $(VAR)/softhsm signerd-dev >/dev/null
	@sed -e "s#@VAR@#$(VAR)#g" -e "s#@UID@#$$(id -u)#g" config/dev.toml.in > $(VAR)/signerd.toml

run: dev-token
	@echo "signerd: socket $(VAR)/run/signerd.sock (Ctrl-C stops it)"
	exec $(PY) -m signerd --config $(VAR)/signerd.toml

test: check
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

check: deps
	$(VENV)/bin/ruff check signerd tests bench examples
	$(VENV)/bin/ruff format --check signerd tests bench examples
	$(VENV)/bin/mypy

bench: deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VAR) bench/results
