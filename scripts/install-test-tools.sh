#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, once per machine (each step is
# skipped when already present; nothing goes into the repository):
# - Debian's headless Chromium, for the web page's end-to-end test;
# - Debian's PostgreSQL server binaries, for the PostgreSQL sink tests (clusters are throwaway);
# - moto (PyPI) in a virtualenv under ~/.cache/cairn-test-tools, the S3-compatible server the S3
#   tests start on 127.0.0.1 (its conditional writes are atomic; telemetry: none);
# - nisshi, the Kafka-protocol broker from ../shared/tools (checksum verified);
# - Azurite and the Azure SDK for JavaScript (npm) under ~/.cache/cairn-test-tools/azurite, the
#   Azure Blob emulator (started with --disableTelemetry).
set -euo pipefail
TOOLS="${CAIRN_TEST_TOOLS:-$HOME/.cache/cairn-test-tools}"
apt_install() { # package, why
  echo "== installing Debian's $1 (one-time, $2)"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || true
  $sudo apt-get install -y -qq "$1" >/dev/null
}
if ! [ -x /usr/bin/chromium ] && ! [ -x /usr/bin/chromium-browser ]; then
  apt_install chromium "for the web page test"
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql "for the PostgreSQL sink tests"
fi
if ! [ -x "$TOOLS/moto-venv/bin/moto_server" ]; then
  echo "== installing moto into $TOOLS/moto-venv (one-time, for the S3 tests)"
  mkdir -p "$TOOLS"
  python3 -m venv "$TOOLS/moto-venv"
  "$TOOLS/moto-venv/bin/pip" install -q --disable-pip-version-check 'moto[s3]' flask flask-cors
fi
if ! [ -x "$TOOLS/azurite/node_modules/.bin/azurite-blob" ] || ! [ -d "$TOOLS/azurite/node_modules/@azure/storage-blob" ]; then
  echo "== installing Azurite into $TOOLS/azurite (one-time, for the Azure tests)"
  mkdir -p "$TOOLS/azurite"
  (cd "$TOOLS/azurite" && { [ -f package.json ] || npm init -y >/dev/null; } \
    && npm install --no-audit --no-fund --silent azurite@3 @azure/storage-blob@12)
fi
if ! [ -x "$TOOLS/nisshi" ]; then
  # The Kafka-protocol broker prebuilt in ../shared/tools (see its README for the checksums and
  # the build command to use if the file is missing).
  SRC="$(cd "$(dirname "$0")/.." && pwd)/../shared/tools/nisshi-0.7.0-x86_64-linux.zst"
  echo "== unpacking nisshi into $TOOLS (one-time, for the Kafka tests)"
  mkdir -p "$TOOLS"
  zstd -q -d -f "$SRC" -o "$TOOLS/nisshi.tmp"
  echo "8788d6b32420720ece50351056d00ebf00335a8d31c5456591efa0d08f4135c3  $TOOLS/nisshi.tmp" | sha256sum -c --quiet
  chmod +x "$TOOLS/nisshi.tmp" && mv "$TOOLS/nisshi.tmp" "$TOOLS/nisshi"
fi
