"""scripts/data_efficiency.py's reading of `dvc exp show` rows (the whole command: tests/test_pipeline.py)."""
from __future__ import annotations

import pandas as pd

from scripts.data_efficiency import with_results


def test_rows_without_metrics_are_left_out_and_metrics_are_numbers():
    shown = pd.DataFrame(
        [  # as dvc.api.exp_show gives them: `!` for a commit without metrics, the workspace repeating an experiment
            {"rev": "workspace", "accuracy": 0.7893, "accuracy_ci95_low": 0.78, "accuracy_ci95_high": 0.80, "train_images": 4500, "fraction": 0.1},
            {"rev": "e191072", "accuracy": 0.7893, "accuracy_ci95_low": 0.78, "accuracy_ci95_high": 0.80, "train_images": 4500, "fraction": 0.1},
            {"rev": "0958ec5", "accuracy": "!", "accuracy_ci95_low": "!", "accuracy_ci95_high": "!", "train_images": "!", "fraction": 0.01},
            {"rev": "19b26e5", "accuracy": "0.7158", "accuracy_ci95_low": 0.707, "accuracy_ci95_high": 0.725, "train_images": 450, "fraction": 0.01},
        ]
    )
    rows = with_results(shown)
    assert list(rows["rev"]) == ["e191072", "19b26e5"]
    assert list(rows["accuracy"]) == [0.7893, 0.7158] and rows["ci95_low"].dtype == float
    assert rows["train_images"].tolist() == [4500, 450]
