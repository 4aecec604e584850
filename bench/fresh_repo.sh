# Sourced by the shell benchmarks: a fresh git repo in a temporary folder holding this project's
# tracked files (its DVC set-up included), entered. Sets root, archive, work and log.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive=$(cd "$root/.." && pwd)/shared/data/cifar10-jpg.tgz
work=$(mktemp -d)
log=$(mktemp)  # outside the repo: dvc exp run restores the workspace it runs in
trap 'rm -rf "$work" "$log"' EXIT
git -C "$root" ls-files -z | (cd "$root" && xargs -0 cp --parents -t "$work")
cd "$work"
git init -q && git config user.name bench && git config user.email bench@example.com
git add -A && git commit -qm project
