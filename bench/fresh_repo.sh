# Sourced by the shell benchmarks: a fresh git repo in a temporary folder holding this project's
# tracked files (its DVC set-up included), entered. Sets root, archive (CIFAR-10, committed), work and log.
# BENCH_REPO=DIR keeps the repo in DIR instead, and reuses it when DIR already holds one (as it was
# made, from the code of that time): its experiments then add up over several runs, for
# scripts/data_efficiency.py to draw.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive=$root/data/cifar10-jpg.tgz
work=${BENCH_REPO:-$(mktemp -d)}
log=$(mktemp)  # outside the repo: dvc exp run restores the workspace it runs in
trap 'rm -f "$log"; [ -n "${BENCH_REPO:-}" ] || rm -rf "$work"' EXIT
if [ ! -d "$work/.git" ]; then
  mkdir -p "$work"
  git -C "$root" ls-files -z | (cd "$root" && xargs -0 cp --parents -t "$work")
  cd "$work"
  git init -q && git config user.name bench && git config user.email bench@example.com
  git add -A && git commit -qm project
fi
cd "$work"
# A reused repo: the workspace back as committed (the last dvc exp run left its results there; they
# live on in that experiment), so the benchmark commits nothing new on top of it.
git reset -q --hard HEAD
