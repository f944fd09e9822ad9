#!/usr/bin/env bash
# Installs the system programs the widget tests drive: Debian's Chromium at /usr/bin/chromium for
# tests/system/test_browser.py, and Node for tests/system/test_js.py (`node --test js/`). Playwright itself comes
# with the test extra; never run `playwright install`, which downloads browsers of its own.
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_browser.sh: chromium and node already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser.sh: run as root to install: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"
test -x /usr/bin/chromium
command -v node >/dev/null
echo "install_browser.sh: installed ${missing[*]}"
