#!/usr/bin/env bash
# The offline job as a user runs it, timed: a fresh git repo holding this project, then
#   dvc exp run (fraction 0.01, download included), dvc repro (unchanged),
#   dvc exp run -S train.lr=... (must not re-run download, preprocess or features).
# (Accuracy per share, with every test image and three seeds, is bench/accuracy_grid.sh's job.)
# Usage: bash bench/offline_job.sh [extra -S overrides...]   Results: bench/results/offline_job.md
source "$(dirname "$0")/fresh_repo.sh"

offline=(-S model.name=efficientnet-lite0 -S "data.source=$archive" -S train.mode=head -S train.lr=3e-3 -S train.epochs=30 -S model.image_size=224 "$@")
out="$root/bench/results/offline_job.md"
{
  echo "# Offline job: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, torch $(python -c 'import torch; print(torch.__version__)')"
  echo
  echo "Overrides: ${offline[*]//$archive/data/cifar10-jpg.tgz}"
  echo
  echo "| command | wall s | stages run | test accuracy (95% CI) | test images | train images |"
  echo "| --- | --- | --- | --- | --- | --- |"
} > "$out"

step() {  # step LABEL dvc-args...
  local label=$1; shift
  local start=$(date +%s.%N)
  dvc "$@" > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
  local secs=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
  local ran=$(grep -o "Running stage '[a-z@]*'" "$log" | cut -d"'" -f2 | paste -sd, -)
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
step "dvc exp run <offline> -S train.lr=1e-3" exp run "${offline[@]}" -S train.lr=1e-3
cat "$out"
