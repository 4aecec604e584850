#!/usr/bin/env bash
# Test accuracy per data share, as a user gets it: `dvc exp run` of the offline job in a fresh git
# repo holding this project, on all 10,000 CIFAR-10 test images, for train.mode head and full,
# fraction 0.01 and 0.05, three seeds each. One row per run goes to bench/results/accuracy_runs.csv
# as it finishes, replacing earlier rows of the modes it runs; bench/accuracy_table.py then summarises
# them (mean ± std) in accuracy.md.
# Usage: bash bench/accuracy_grid.sh [head] [full]   (both by default; hours on 2 CPU cores)
source "$(dirname "$0")/fresh_repo.sh"

common=(-S model.name=efficientnet-lite0 -S "data.source=$archive" -S data.test_fraction=1.0)
head=(-S train.mode=head -S model.image_size=224 -S train.lr=3e-3 -S train.epochs=30)
full=(-S train.mode=full -S model.image_size=128 -S train.lr=5e-4 -S train.epochs=5)
modes=("$@"); [ $# -gt 0 ] || modes=(head full)
runs="$root/bench/results/accuracy_runs.csv"
header="mode,fraction,seed,accuracy,ci95_low,ci95_high,test_images,train_images,wall_seconds,stages_run"
kept=$( [ -f "$runs" ] && tail -n +2 "$runs" | grep -v -E "^($(IFS='|'; echo "${modes[*]}")),") || true
printf '%s\n' "$header" ${kept:+"$kept"} > "$runs"

python -c "import sys, yaml; p = yaml.safe_load(open('params.yaml')); p['data']['source'] = sys.argv[1]; yaml.safe_dump(p, open('params.yaml', 'w'), sort_keys=False)" "$archive"
dvc repro download > "$log" 2>&1 || { tail -20 "$log"; exit 1; }  # not timed: the same for every run
git add -A && git commit -qm download

for mode in "${modes[@]}"; do
  for fraction in 0.01 0.05; do
    for seed in 42 43 44; do
      if [ "$mode" = head ]; then recipe=("${head[@]}"); else recipe=("${full[@]}"); fi
      start=$(date +%s.%N)
      dvc exp run "${common[@]}" "${recipe[@]}" -S fraction=$fraction -S seed=$seed > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
      secs=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
      ran=$(grep -o "Running stage '[a-z@]*'" "$log" | cut -d"'" -f2 | paste -sd' ' -)
      python - "$mode" "$fraction" "$seed" "$secs" "$ran" >> "$runs" <<'PY'
import json, sys
mode, fraction, seed, secs, ran = sys.argv[1:]
e, f = json.load(open("metrics/eval.json")), json.load(open("metrics/finetune.json"))
print(f"{mode},{fraction},{seed},{e['accuracy']:.4f},{e['accuracy_ci95_low']:.4f},{e['accuracy_ci95_high']:.4f},{e['test_images']},{f['train_images']},{secs},{ran}")
PY
      tail -1 "$runs"
    done
  done
done
