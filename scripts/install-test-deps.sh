#!/usr/bin/env bash
# System packages the test suite needs beyond pip: Debian's chromium for the
# browser test (tests/test_web_e2e.py). Playwright drives it from the system,
# so `playwright install` is never needed. Safe to run again: it installs only
# what is missing.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "chromium is missing; run this script as root to install it" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
chromium --version 2>/dev/null
