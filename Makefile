# signerd: set-up, run, test, benchmark.
#   make run    install what running needs, make a dev SoftHSM token under var/, run signerd in the foreground
#   make test   install the test and benchmark tools too and run the whole suite against real SoftHSM and OpenBao
#   make bench  the benchmark harness (make bench BENCH_ARGS=--quick for a short run)
#   make soak   10 minutes of mixed load on a daemon with two workers, checked; build/soak.png
#   make dist   build a wheel and an sdist into dist/ (what operators install)
#   make docs   build the documentation site into build/site (mkdocs build --strict)
#   make install DESTDIR=... PREFIX=/usr   units, sysusers.d/tmpfiles.d snippets, configuration, docs,
#               man pages and signerctl's shell completions (bash, zsh, fish)
#   make generated   rewrite share/ (man pages, completions) from the programs' parsers

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export SOFTHSM2_CONF := $(VAR)/softhsm/softhsm2.conf
# what running needs; make test adds the test and benchmark tools
RUN_EXTRAS := pkcs11,vault,systemd,redis,uvloop,sodium

.PHONY: run test history soak bench check docs dist system deps deps-run dev-token clean install generated

system:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v ssh-agent >/dev/null || missing="$$missing openssh-client"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	command -v setfacl >/dev/null || missing="$$missing acl"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v rsyslogd >/dev/null || missing="$$missing rsyslog"; \
	ls /usr/lib/*/rsyslog/lmnsd_ossl.so >/dev/null 2>&1 || missing="$$missing rsyslog-openssl"; \
	ls /usr/lib/*/rsyslog/imrelp.so >/dev/null 2>&1 || missing="$$missing rsyslog-relp"; \
	pkg-config --exists libsystemd 2>/dev/null || missing="$$missing libsystemd-dev"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v rsyslogd >/dev/null || missing="$$missing rsyslog"; \
	for tool in curl jq openssl; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	$(PYTHON) -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]; assert os.path.exists(os.path.join(p, "Python.h"))' \
	  2>/dev/null || missing="$$missing python3-dev"; \
	command -v man >/dev/null || missing="$$missing man-db"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# systemd-python has no wheel: it is compiled (gcc, python3-dev, libsystemd-dev from make system)
$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(RUN_EXTRAS)]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run
	$(PY) -m pip install -q -e '.[$(RUN_EXTRAS),test,bench]'
	touch $@

# npm's jose (pinned by tests/jose/package-lock.json): the independent JOSE
# implementation the tests verify signerd's JWKS and signatures with.
JOSE_DIR := build/jose
export SIGNERD_JOSE_DIR := $(CURDIR)/$(JOSE_DIR)

$(JOSE_DIR)/.installed: tests/jose/package.json tests/jose/package-lock.json tests/jose/verify.mjs
	mkdir -p $(JOSE_DIR)
	cp tests/jose/package.json tests/jose/package-lock.json tests/jose/verify.mjs $(JOSE_DIR)/
	cd $(JOSE_DIR) && npm ci --no-audit --no-fund --ignore-scripts
	touch $@


deps-run: system $(VENV)/.installed-run

deps: system $(VENV)/.installed-test $(JOSE_DIR)/.installed

dev-token: deps-run
	@mkdir -p $(VAR)/run $(VAR)/log
	@chmod 0750 $(VAR)/run  # signerd refuses a socket directory others can write to
	@softhsm/make-token.sh $(VAR)/softhsm signerd-dev >/dev/null
	@sed -e "s#@VAR@#$(VAR)#g" -e "s#@UID@#$$(id -u)#g" config/dev.toml.in > $(VAR)/signerd.toml

run: dev-token
	@echo "signerd: socket $(VAR)/run/signerd.sock (Ctrl-C stops it)"
	exec $(PY) -m signerd --config $(VAR)/signerd.toml

test: check
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests

# the concurrent lifecycle histories at full length (make test runs them for 30 s each)
history: deps
	SIGNERD_HISTORY_SECONDS=60 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests/history

# the soak at full length (make test runs it for 2 minutes): its PNG and numbers in build/
SOAK_SECONDS ?= 600
soak: deps
	mkdir -p build
	SIGNERD_SOAK_SECONDS=$(SOAK_SECONDS) SIGNERD_SOAK_PNG=$(CURDIR)/build/soak.png \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -s tests/reliability/test_soak.py

check: deps
	$(VENV)/bin/ruff check signerd tests bench examples
	$(VENV)/bin/ruff format --check signerd tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(MAKE) --no-print-directory docs

docs: deps
	$(VENV)/bin/mkdocs build --strict --site-dir $(CURDIR)/build/site

# the wheel and sdist an operator installs (pip install dist/signerd-VERSION-py3-none-any.whl)
dist: deps
	rm -rf dist
	$(PY) -m build --outdir dist .

# the man pages and shell completions under share/, from the parsers (a test checks them)
generated: deps
	$(PY) -m tests.support.generate

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
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
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
	install -m 0644 README.md LICENSE $(DESTDIR)$(DOCDIR)/
	install -d -m 0755 $(DESTDIR)$(DOCDIR)/docs
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/
	install -D -m 0644 share/man/signerctl.1 $(DESTDIR)$(MANDIR)/man1/signerctl.1
	install -D -m 0644 share/man/signerd.8 $(DESTDIR)$(MANDIR)/man8/signerd.8
	install -D -m 0644 share/completions/signerctl.bash $(DESTDIR)$(BASHCOMPDIR)/signerctl
	install -D -m 0644 share/completions/_signerctl $(DESTDIR)$(ZSHCOMPDIR)/_signerctl
	install -D -m 0644 share/completions/signerctl.fish $(DESTDIR)$(FISHCOMPDIR)/signerctl.fish
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/signerd
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/signerd/credentials
	install -m 0640 config/signerd.example.toml $(DESTDIR)$(SYSCONFDIR)/signerd/signerd.toml.example
	[ -e $(DESTDIR)$(SYSCONFDIR)/signerd/signerd.toml ] || \
	  install -m 0640 systemd/signerd.toml $(DESTDIR)$(SYSCONFDIR)/signerd/signerd.toml

clean:
	rm -rf $(VENV) $(VAR) bench/results build dist
