# signerd: set-up, run, test, benchmark.
#   make run    install what is missing, make a dev SoftHSM token under var/, run signerd in the foreground
#   make test   install what is missing and run the whole suite against real SoftHSM and OpenBao
#   make bench  the benchmark harness (make bench BENCH_ARGS=--quick for a short run)
#   make install DESTDIR=... PREFIX=/usr   units, sysusers.d/tmpfiles.d snippets, configuration

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SOFTHSM2_CONF := $(VAR)/softhsm/softhsm2.conf

.PHONY: run test bench check system deps dev-token clean install

system:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v ssh-agent >/dev/null || missing="$$missing openssh-client"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	command -v setfacl >/dev/null || missing="$$missing acl"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	pkg-config --exists libsystemd 2>/dev/null || missing="$$missing libsystemd-dev"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[pkcs11,vault,systemd,redis,uvloop,test,bench]'
	touch $@

deps: system $(VENV)/.installed

dev-token: deps
	@mkdir -p $(VAR)/run $(VAR)/log
	@chmod 0750 $(VAR)/run  # signerd refuses a socket directory others can write to
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
	$(VENV)/bin/lint-imports

bench: deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench.run $(BENCH_ARGS)

# Where a distribution package puts things. BINDIR is where signerd and
# signerctl are (the units' ExecStart= is rewritten to it).
DESTDIR ?=
PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DATADIR ?= $(PREFIX)/share/signerd
DOCDIR ?= $(PREFIX)/share/doc/signerd
UNITS := signerd.socket signerd.service signerd-rotate@.service signerd-rotate@.timer \
  signerd-rotate-staged@.service signerd-rotate-staged@.timer

install:
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) \
	  $(DESTDIR)$(DATADIR) $(DESTDIR)$(DOCDIR)
	for unit in $(UNITS); do \
	  sed -e 's#/usr/bin/#$(BINDIR)/#g' systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit && \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit || exit 1; \
	done
	install -m 0644 systemd/signerd.sysusers $(DESTDIR)$(SYSUSERSDIR)/signerd.conf
	install -m 0644 systemd/signerd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/signerd.conf
	install -m 0644 systemd/network-backend.conf $(DESTDIR)$(DATADIR)/network-backend.conf
	install -m 0755 softhsm/make-token.sh $(DESTDIR)$(DATADIR)/make-token.sh
	install -m 0644 softhsm/softhsm2.conf.in $(DESTDIR)$(DATADIR)/softhsm2.conf.in
	install -m 0644 README.md docs/protocol.md $(DESTDIR)$(DOCDIR)/
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/signerd
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/signerd/credentials
	install -m 0640 config/signerd.example.toml $(DESTDIR)$(SYSCONFDIR)/signerd/signerd.toml.example
	[ -e $(DESTDIR)$(SYSCONFDIR)/signerd/signerd.toml ] || \
	  install -m 0640 systemd/signerd.toml $(DESTDIR)$(SYSCONFDIR)/signerd/signerd.toml

clean:
	rm -rf $(VENV) $(VAR) bench/results
