#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, once per machine (skipped when
# present): Debian's headless Chromium for the web page's end-to-end test.
set -euo pipefail
if [ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ]; then
  exit 0
fi
echo "== installing Debian's chromium (one-time, for the web page test)"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq chromium >/dev/null
