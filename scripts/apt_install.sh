#!/usr/bin/env bash
# apt_install.sh PACKAGE...: install Debian packages with apt-get, as root or through sudo without a
# password prompt. Exits 1 with one line saying what to run when it cannot.
set -euo pipefail
if ! command -v apt-get >/dev/null; then
  echo "apt_install: no apt-get on this machine: install $* with its package manager" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "apt_install: not root and no password-less sudo: run 'sudo apt-get install $*'" >&2
  exit 1
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@"
