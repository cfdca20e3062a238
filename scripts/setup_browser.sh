#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the playground test (tests/test_playground_browser.py),
# from Debian's packages. Idempotent and quiet: does nothing when both are installed.
# Needs root on Linux; elsewhere it says so and leaves the test to skip.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(uname -s)" != "Linux" ] || [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "[setup] not root on Debian/Ubuntu: install chromium and chromium-driver yourself" \
    "for the playground browser test"
  exit 0
fi
echo "[setup] installing chromium and chromium-driver (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
/usr/bin/chromium --version
