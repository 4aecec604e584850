"""Screenshot the MLflow UI's comparison of runs that differ only in `fraction`, in headless Chromium.

    python scripts/compare_runs.py                        # the project's mlflow.db -> docs/mlflow_compare.png
    python scripts/compare_runs.py --tracking-uri http://127.0.0.1:5000 --out /tmp/compare.png

Starts `mlflow server` on loopback over the store (unless given an http:// tracking URI), picks the
newest finished run and, for every other `fraction`, the newest finished run whose other parameters
(but `seed`) are the same, and opens their comparison in Debian's `chromium` through Playwright: the
scatter plot of `test_accuracy` against `fraction` on top, then only the parameters that differ
(paths the runs share, such as `data.source`, stay out of view), the metrics scrolled to
`test_accuracy`, and the tags with the hardware. It checks that these show and saves the page.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import quote

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: scripts.servers

from scripts.data_efficiency import ACROSS  # noqa: E402  (runs on one line of the curve: they differ only in these)
from scripts.servers import mlflow_server  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
MUST_SHOW = ("test_accuracy", "fraction", "hardware.cpu")
ROW_IN_VIEW = """([grid, name]) => {
    const row = [...grid.querySelectorAll('*')].filter(e => e.textContent.trim() === name).pop();
    if (!row) return false;
    const [outer, inner] = [grid.getBoundingClientRect(), row.getBoundingClientRect()];
    return inner.top >= outer.top && inner.bottom <= outer.bottom;
}"""


def runs_to_compare(url: str, experiment: str) -> tuple[str, list[str]]:
    """(experiment id, [the newest finished run's id, and per other fraction the newest finished run with
    the same parameters but fraction and seed, by fraction]) through the REST API."""
    got = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}, timeout=10)
    got.raise_for_status()
    experiment_id = got.json()["experiment"]["experiment_id"]
    found = requests.post(
        f"{url}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": "attributes.status = 'FINISHED'", "order_by": ["attributes.start_time DESC"]},
        timeout=10,
    )
    found.raise_for_status()
    by_fraction: dict[str, str] = {}
    configuration = None
    for run in found.json().get("runs", []):
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        if "fraction" not in params:
            continue
        rest = {k: v for k, v in params.items() if k not in ACROSS}
        configuration = configuration or rest
        if rest == configuration:
            by_fraction.setdefault(params["fraction"], run["info"]["run_id"])
    if len(by_fraction) < 2:
        raise SystemExit(f"error: experiment {experiment!r} has no two finished runs that differ only in fraction; run e.g. dvc exp run -S fraction=0.02")
    return experiment_id, [by_fraction[f] for f in sorted(by_fraction, key=float)]


def shown(page, text: str):
    """The first visible element whose whole text is `text` (hidden copies sit in folded plot menus)."""
    return page.get_by_text(text, exact=True).filter(visible=True).first


def screenshot_comparison(url: str, experiment_id: str, run_ids: list[str], out: Path) -> str:
    """Open the comparison page, wait until the runs' values show, save a PNG of it; return the page text."""
    from playwright.sync_api import sync_playwright

    page_url = f"{url}/#/compare-runs?runs={quote(json.dumps(run_ids))}&experiments={quote(json.dumps([experiment_id]))}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root, as in CI, has no sandbox
        try:
            page = browser.new_page(viewport={"width": 1200 + 200 * len(run_ids), "height": 2400})
            page.goto(page_url)
            shown(page, "data.classes").wait_for(timeout=60_000)
            page.get_by_text("Artifacts", exact=True).first.click()  # folded, so that the rest fits one screen
            page.get_by_text("Scatter Plot", exact=True).first.click()
            for axis, name in (("x", "fraction"), ("y", "test_accuracy")):
                page.locator(f"#{axis}-axis-selector").click()
                page.get_by_role("option", name=name, exact=True).click()
            # The metrics table renders only the rows in its 300 px window, names and values in two grids:
            # scroll both, a row at a time, until the accuracy's row is inside the window.
            # anchored on the first metric by name, which the 300 px window renders; every row shows (no "Show diff only": it hides the anchor)
            box = shown(page, "data.classes").locator("xpath=ancestor::div[contains(@class, 'collapse-content-box')]")
            grids = box.locator(".ReactVirtualized__Grid").element_handles()
            for _ in range(100):
                if page.evaluate(ROW_IN_VIEW, [grids[0], "test_accuracy"]):
                    break
                page.evaluate("([names, values]) => { values.scrollTop += 44; names.scrollTop = values.scrollTop; }", grids)
                page.wait_for_timeout(150)
            page.wait_for_timeout(500)
            for text in MUST_SHOW:
                shown(page, text).wait_for(timeout=10_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.locator("main").first.screenshot(path=str(out))  # the comparison, without the side panels
            return page.inner_text("body")
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default="cifar10-transfer")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    args = parser.parse_args()
    if args.tracking_uri.startswith("http"):
        server = nullcontext(args.tracking_uri)
    else:
        server = mlflow_server(args.tracking_uri, Path("mlartifacts").resolve())
    with server as url:
        experiment_id, run_ids = runs_to_compare(url, args.experiment)
        screenshot_comparison(url, experiment_id, run_ids, args.out)
    print(f"compared runs {', '.join(run_ids)}: {args.out}")


if __name__ == "__main__":
    main()
