# mta: `make run` starts the MTA in the foreground on etc/mta.toml;
# `make test` installs what the tests need (Python packages and the Debian
# packages of the real peers) and runs the whole suite.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= etc/mta.toml
SOURCES = pyproject.toml $(shell find mta twisted -name '*.py' 2>/dev/null)

# Debian packages of the peers the integration tests talk to (PEERS.md).
# swaks needs libnet-ssleay-perl for --tls/--tlsc (a Recommends, which
# --no-install-recommends would leave out).  systemd: for systemd-analyze verify of
# etc/examples/mta.service (it is not run).  libmail-dkim-perl, opendkim-tools: independent
# DKIM verifiers; publicsuffix: Debian's public suffix list, which a test compares with ours.
PEER_PACKAGES = swaks libnet-ssleay-perl postfix curl fetchmail msmtp dnsmasq-base openssl fail2ban systemd \
	libmail-dkim-perl opendkim-tools publicsuffix

.PHONY: run test venv peers bench soak lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A normal (not editable) install: twistd finds the plugin the way users' will.
$(VENV)/.installed: $(BIN)/activate $(SOURCES)
	$(BIN)/pip install -q --no-warn-script-location '.[test]'
	rm -rf build
	@touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/twistd -n --pidfile= mta --config $(CONFIG)

peers:
	@missing=""; \
	for p in $(PEER_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing peers for the tests (missing:$$missing)"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(PEER_PACKAGES) >/dev/null; \
	fi

test: venv peers
	$(BIN)/pytest -q

# The bench's own packages (the `bench` extra: aiosmtpd, matplotlib).
$(VENV)/.bench-installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --no-warn-script-location '.[test,bench]'
	rm -rf build
	@touch $@

bench: venv peers $(VENV)/.bench-installed
	$(BIN)/python bench/run.py

# receive -> queue -> relay -> sink for SOAK_MINUTES (default 15) under random
# faults, then checks (soak/run.py; needs root for its tmpfs spool). Not part of `make test`.
soak: venv peers
	$(BIN)/python soak/run.py

lint: venv
	$(BIN)/ruff check mta tests twisted

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
