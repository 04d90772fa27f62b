#!/usr/bin/env bash
# System packages the test suite needs beyond pip: Debian's chromium for the
# browser test (tests/test_web_e2e.py) and Debian's postgresql for the
# PostgreSQL history store (tests/conftest.py starts a throwaway cluster with
# its initdb and pg_ctl; the packaged service itself is never used).
# Playwright drives chromium from the system, so `playwright install` is never
# needed. Safe to run again: it installs only what is missing.
set -euo pipefail

missing=()
if ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    missing+=(postgresql)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "${missing[*]} missing; run this script as root to install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
chromium --version 2>/dev/null
ls -d /usr/lib/postgresql/*/bin
