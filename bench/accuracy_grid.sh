#!/usr/bin/env bash
# Test accuracy per data share, as a user gets it: `dvc exp run` of the offline job in a fresh git
# repo holding this project, on all 10,000 CIFAR-10 test images, for the given embedded model and
# train modes, fraction 0.01 and 0.05, three seeds each. One row per run goes to
# bench/results/accuracy_runs.csv as it finishes, replacing an earlier row of the same model, mode,
# fraction, seed and recipe, with what the validation split saw (the kept epoch's accuracy and NLL, the
# fitted temperature); bench/accuracy_table.py then summarises them (mean ± std) in accuracy.md.
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
import pandas as pd
runs, model, mode, fraction, seed, recipe, secs, ran = sys.argv[1:]
e, f = json.load(open("metrics/eval.json")), json.load(open("metrics/finetune.json"))
row = {
    "model": model, "mode": mode, "fraction": float(fraction), "seed": int(seed), "recipe": recipe,
    "accuracy": round(e["accuracy"], 4), "ci95_low": round(e["accuracy_ci95_low"], 4), "ci95_high": round(e["accuracy_ci95_high"], 4),
    "test_images": e["test_images"], "train_images": f["train_images"], "ece": round(e["ece"], 4), "ece_at_temperature_1": round(e["ece_at_temperature_1"], 4),
    "kept_epoch": f["kept_epoch"], "temperature": round(f["temperature"], 3), "wall_seconds": float(secs), "stages_run": ran,
    # what the validation split saw: the kept epoch's accuracy and NLL, the fitted temperature and the NLL at 1 and at it
    "kept_by": f["keep_epoch"], "val_images": f["val_images"], "kept_val_accuracy": round(f["kept_val_accuracy"], 4),
    "kept_val_loss": round(f["kept_val_loss"], 4), **{k: round(f[k], 4) for k in ("fitted_temperature", "val_nll", "val_nll_fitted") if k in f},
}
path, key = Path(runs), ["model", "mode", "fraction", "seed", "recipe"]
old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(row))
old = old[~(old[key] == pd.Series({k: row[k] for k in key})).all(axis=1)]
pd.concat([old, pd.DataFrame([row])], ignore_index=True).astype({"kept_epoch": "Int64", "val_images": "Int64"}).to_csv(path, index=False)
print(",".join(str(v) for v in row.values()))
PY
    done
  done
done
