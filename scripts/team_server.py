"""The team's tracking server, started locally: PostgreSQL as MLflow's store, an S3-compatible object
store (moto's server mode) for the artifacts and the DVC remote, and `mlflow server`, all on loopback.

    python scripts/team_server.py --dir team-server     # Ctrl-C stops all three

It prints the lines to export in each clone. PostgreSQL keeps its data in `--dir` between starts;
moto keeps objects in memory only, so a lasting server puts its artifacts in real object storage
(`mlflow server --artifacts-destination s3://...`, see docs/team.md).
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: scripts.servers

from scripts.servers import S3_CREDENTIALS, create_bucket, mlflow_server, postgres, s3_server  # noqa: E402

BUCKET = "team"


@dataclass(frozen=True)
class TeamServer:
    tracking_uri: str  # what every clone sets as MLFLOW_TRACKING_URI
    s3_endpoint: str
    backend_uri: str  # PostgreSQL, as MLflow's --backend-store-uri
    artifacts: str  # s3://team/mlflow: MLflow proxies it, so clients need no S3 credentials
    dvc_remote: str  # s3://team/dvcstore


@contextmanager
def team_server(folder: Path) -> Iterator[TeamServer]:
    with postgres(folder / "postgres") as backend, s3_server() as endpoint:
        create_bucket(endpoint, BUCKET)
        artifacts = f"s3://{BUCKET}/mlflow"
        with mlflow_server(backend, artifacts, S3_CREDENTIALS | {"MLFLOW_S3_ENDPOINT_URL": endpoint}) as url:
            yield TeamServer(url, endpoint, backend, artifacts, f"s3://{BUCKET}/dvcstore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("team-server"), help="PostgreSQL's data folder (default: team-server)")
    args = parser.parse_args()
    with team_server(args.dir.resolve()) as server:
        print(f"MLflow on PostgreSQL ({server.backend_uri}), artifacts in {server.artifacts} at {server.s3_endpoint}. In each clone:")
        print(f"  export MLFLOW_TRACKING_URI={server.tracking_uri}")
        print(f"  dvc remote add -d storage {server.dvc_remote} && dvc remote modify storage endpointurl {server.s3_endpoint}")
        print("  " + " ".join(f"export {k}={v}" for k, v in S3_CREDENTIALS.items()) + "   # for dvc push/pull only")
        print("Ctrl-C stops the three servers.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops them as cleanly as Ctrl-C
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
