#!/usr/bin/env bash
# make_venv.sh DIR: a virtual environment at DIR from python3 (3.10 or newer). Debian and Ubuntu ship
# python3 without ensurepip: then their python3-venv package is installed first, where apt_install can.
set -euo pipefail
venv=$1
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "make_venv: $(python3 --version 2>&1) is too old: the project needs Python 3.10 or newer" >&2; exit 1; }
if ! python3 -m venv "$venv" 2>/dev/null; then
  rm -rf "$venv"
  echo "make_venv: python3 -m venv needs ensurepip: installing Debian's python3-venv" >&2
  bash "$(dirname "$0")/apt_install.sh" python3-venv
  python3 -m venv "$venv"
fi
