#!/usr/bin/env bash
# System packages the test suite needs: bubblewrap (bwrap), the sandbox for generated code
# (factory/tasks/code.py, docs/sandbox.md). Idempotent and quiet: does nothing when bwrap is
# already installed; otherwise installs it with apt-get (as root, or through sudo when available).
set -euo pipefail

if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: bwrap is missing and apt-get is not available;" \
       "install the 'bubblewrap' package with your system's package manager" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
  else
    echo "install-system-deps: bwrap is missing and this is not root (no sudo);" \
         "run: apt-get install -y bubblewrap" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
command -v bwrap >/dev/null 2>&1
