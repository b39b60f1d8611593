#!/usr/bin/env bash
# Debian packages the suite needs beyond Python, installed only when missing (quick otherwise):
#   chromium      the real-browser tests (tests/e2e/test_docs_browser.py drive it with Playwright
#                 for Python through executable_path; Playwright's own browser download is never
#                 used: these machines reach only the package registries)
#   node + npm    tools/ (npm ci): the TypeScript client generation and tsc --strict check
set -eu
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "FATAL: missing ${missing[*]}; installing needs root (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian packages for the tests: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for tool in chromium node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "FATAL: $tool did not install" >&2; exit 1; }
done
