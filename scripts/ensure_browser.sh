#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test when it is missing and we may (root + apt).
# Never downloads a browser build of its own. Without Chromium the browser test skips with a reason.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: chromium not installed (needs root + apt-get); the browser test will be skipped" >&2
  exit 0
fi
echo "installing Debian chromium for the browser test..." >&2
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core; } \
  >/tmp/ensure_browser.log 2>&1 || echo "note: chromium install failed (see /tmp/ensure_browser.log); browser test will skip" >&2
exit 0
