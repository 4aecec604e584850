#!/usr/bin/env bash
# The offline job as a user runs it, timed: a fresh git repo holding this project, then
#   dvc exp run (fraction 0.01, download included), dvc repro (unchanged),
#   dvc exp run -S train.lr=... (must not re-run download or preprocess), dvc exp run -S fraction=0.05.
# Usage: bash bench/offline_job.sh [extra -S overrides...]   Results: bench/results/offline_job.md
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
archive=$(cd "$root/.." && pwd)/shared/data/cifar10-jpg.tgz
work=$(mktemp -d)
log=$(mktemp)  # outside the repo: dvc exp run restores the workspace it runs in
trap 'rm -rf "$work" "$log"' EXIT
cp -r "$root/dvc.yaml" "$root/params.yaml" "$root/.gitignore" "$root/data" "$root/models" "$root/metrics" "$work/"
cp -r "$root/stages" "$work/" && rm -rf "$work"/stages/__pycache__
cd "$work"
git init -q && git config user.name bench && git config user.email bench@example.com
dvc init -q && git add -A && git commit -qm project

offline=(-S model.name=efficientnet-lite0 -S "data.source=$archive" -S train.lr=1e-3 -S model.image_size=128 "$@")
out="$root/bench/results/offline_job.md"
{
  echo "# Offline job: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, torch $(python -c 'import torch; print(torch.__version__)')"
  echo
  echo "Overrides: ${offline[*]//$archive/../shared/data/cifar10-jpg.tgz}"
  echo
  echo "| command | wall s | stages run | test accuracy (95% CI) | test images | train images |"
  echo "| --- | --- | --- | --- | --- | --- |"
} > "$out"

step() {  # step LABEL dvc-args...
  local label=$1; shift
  local start=$(date +%s.%N)
  dvc "$@" > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
  local secs=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
  local ran=$(grep -o "Running stage '[a-z]*'" "$log" | cut -d"'" -f2 | paste -sd, -)
  python - "$label" "$secs" "${ran:-none}" >> "$out" <<'PY'
import json, sys
label, secs, ran = sys.argv[1:]
e, f = json.load(open("metrics/eval.json")), json.load(open("metrics/finetune.json"))
print(f"| `{label}` | {secs} | {ran} | {e['accuracy']:.4f} ({e['accuracy_ci95_low']:.3f}-{e['accuracy_ci95_high']:.3f}) | {e['test_images']} | {f['train_images']} |")
PY
  git add -A >/dev/null; git commit -qm "$label" >/dev/null || true
}
step "dvc exp run <offline> (fraction 0.01)" exp run "${offline[@]}"
step "dvc repro (unchanged)" repro
step "dvc exp run <offline> -S train.lr=5e-4" exp run "${offline[@]}" -S train.lr=5e-4
step "dvc exp run <offline> -S fraction=0.05" exp run "${offline[@]}" -S fraction=0.05
cat "$out"
