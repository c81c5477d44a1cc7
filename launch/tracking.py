"""Run a local MLflow tracking server: `python launch/tracking.py [mlflow_server.port=5000] [mlflow_server.root=outputs/mlflow]`

Runs and the model registry in SQLite, artifacts under the same folder; point jobs at it with
`tracking=mlflow tracking.uri=http://127.0.0.1:5000` (docs/evaluation.md). Stops on SIGTERM or Ctrl-C."""

import os

from framework.cli import entry
from framework.tracking import MLFLOW_SERVER, ServerConfig, server_command


@entry(MLFLOW_SERVER)
def main(s: ServerConfig) -> None:
    os.makedirs(os.path.abspath(s.root), exist_ok=True)
    print(f"tracking: MLflow at http://{s.host}:{s.port} (runs and registry: {os.path.abspath(s.root)}/mlflow.db)", flush=True)
    command = server_command(s)
    os.execv(command[0], command)  # the server takes this process's place: SIGTERM reaches it


if __name__ == "__main__":
    main()
