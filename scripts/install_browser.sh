#!/usr/bin/env bash
# Installs what tests/test_browser.py drives: Debian's Chromium at /usr/bin/chromium (Playwright
# itself comes with the test extra; never `playwright install`, which downloads its own browsers).
# Idempotent: does nothing when Chromium is already there. Needs root (CI runs as root).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: /usr/bin/chromium"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser.sh: run as root (apt-get install -y chromium)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q chromium
test -x /usr/bin/chromium
echo "chromium installed: /usr/bin/chromium"
