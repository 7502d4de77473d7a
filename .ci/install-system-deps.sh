#!/usr/bin/env bash
# System packages the test suite needs:
#   bubblewrap (bwrap): the sandbox for generated code (factory/tasks/code.py, docs/sandbox.md);
#   chromium: the headless browser that opens the HTML report (tests/integration/test_report_html.py).
# Idempotent and quiet: does nothing when every command is already installed; otherwise installs
# the missing packages with apt-get (as root, or through sudo when available).
set -euo pipefail

# command -> Debian package
declare -A PACKAGES=([bwrap]=bubblewrap [chromium]=chromium)
missing=()
for cmd in "${!PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGES[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: missing ${missing[*]} and apt-get is not available;" \
       "install them with your system's package manager" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
  else
    echo "install-system-deps: missing ${missing[*]} and this is not root (no sudo);" \
         "run: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for cmd in "${!PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1
done
