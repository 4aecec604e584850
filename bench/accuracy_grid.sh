#!/usr/bin/env bash
# Test accuracy per data share, as a user gets it: `dvc exp run` of the offline job in a fresh git
# repo holding this project, on all 10,000 CIFAR-10 test images, for the given embedded model and
# train modes, fraction 0.01 and 0.05, three seeds each. One row per run goes to
# bench/results/accuracy_runs.csv as it finishes, replacing an earlier row of the same model, mode,
# fraction and seed; bench/accuracy_table.py then summarises them (mean ± std) in accuracy.md.
# Usage: bash bench/accuracy_grid.sh MODEL MODE...   e.g. efficientnet-lite0 head full head-then-full
#        (hours on 2 CPU cores; FRACTIONS="0.01" SEEDS="42" narrow it; BENCH_REPO=DIR keeps the
#        repo and its experiments for scripts/data_efficiency.py, see bench/fresh_repo.sh;
#        EXTRA="train.augment=trivialaugment train.mixup=0.2" sets more params, the run's `recipe` column)
source "$(dirname "$0")/fresh_repo.sh"

model=$1; shift
modes=("$@")
common=(-S "model.name=$model" -S "data.source=$archive" -S data.test_fraction=1.0)
for assignment in ${EXTRA:-}; do common+=(-S "$assignment"); done
recipe_name=${EXTRA:-defaults}
# lr and epochs: each mode's `auto` recipe; full mode at 128 px (4x faster on a CPU), the others at the model's own size
declare -A recipe=(
  [head]="-S train.mode=head -S model.image_size=null -S train.lr=auto -S train.epochs=auto"
  [full]="-S train.mode=full -S model.image_size=128 -S train.lr=auto -S train.epochs=auto"
  [head-then-full]="-S train.mode=head-then-full -S model.image_size=null -S train.lr=auto -S train.epochs=auto -S train.head_lr=auto -S train.head_epochs=auto"
)
runs="$root/bench/results/accuracy_runs.csv"

python -c "import sys, yaml; p = yaml.safe_load(open('params.yaml')); p['data']['source'] = sys.argv[1]; yaml.safe_dump(p, open('params.yaml', 'w'), sort_keys=False)" "$archive"
dvc repro download > "$log" 2>&1 || { tail -20 "$log"; exit 1; }  # not timed: the same for every run
git add -A && { git diff --cached --quiet || git commit -qm download; }  # a reused BENCH_REPO has it already

for mode in "${modes[@]}"; do
  for fraction in ${FRACTIONS:-0.01 0.05}; do
    for seed in ${SEEDS:-42 43 44}; do
      start=$(date +%s.%N)
      # shellcheck disable=SC2086  # the recipe is a list of words
      dvc exp run "${common[@]}" ${recipe[$mode]} -S fraction=$fraction -S seed=$seed > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
      secs=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
      ran=$(grep -o "Running stage '[a-z@]*'" "$log" | cut -d"'" -f2 | paste -sd' ' -)
      python - "$runs" "$model" "$mode" "$fraction" "$seed" "$recipe_name" "$secs" "$ran" <<'PY'
import json, sys
from pathlib import Path
runs, model, mode, fraction, seed, recipe, secs, ran = sys.argv[1:]
header = "model,mode,fraction,seed,recipe,accuracy,ci95_low,ci95_high,test_images,train_images,ece,ece_at_temperature_1,kept_epoch,temperature,wall_seconds,stages_run"
e, f = json.load(open("metrics/eval.json")), json.load(open("metrics/finetune.json"))
row = (f"{model},{mode},{fraction},{seed},{recipe},{e['accuracy']:.4f},{e['accuracy_ci95_low']:.4f},{e['accuracy_ci95_high']:.4f},{e['test_images']},"
       f"{f['train_images']},{e['ece']:.4f},{e['ece_at_temperature_1']:.4f},{f['kept_epoch']},{f['temperature']:.3f},{secs},{ran}")
path = Path(runs)
kept = [r for r in (path.read_text().splitlines()[1:] if path.exists() else []) if r.split(",")[:5] != row.split(",")[:5]]
path.write_text("\n".join([header, *kept, row]) + "\n")
print(row)
PY
    done
  done
done
