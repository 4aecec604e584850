#!/usr/bin/env bash
# The Debian packages the tests need and PyPI does not have: chromium (Playwright drives it in the
# MLflow UI test, no browser download) and postgresql (the team server test; its programs live off
# PATH, in /usr/lib/postgresql). Installed when missing and apt_install can; otherwise the tests that
# need them skip with one line naming the package (tests/conftest.py), or fail under CI=true.
set -uo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "system_packages: installing ${missing[*]} for the tests"
bash "$(dirname "$0")/apt_install.sh" "${missing[@]}" || echo "system_packages: the tests that need ${missing[*]} will skip (under CI=true, fail)"
exit 0
