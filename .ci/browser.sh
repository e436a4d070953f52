#!/usr/bin/env bash
# The web UI tests drive Debian's Chromium through Playwright. Install it when it is missing and this
# machine can (root + apt); otherwise say how, in one line (the browser tests then fail saying the same).
set -uo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }
fi
command -v chromium >/dev/null || echo "browser: chromium is not installed (apt-get install chromium); the web UI tests will fail" >&2
exit 0
