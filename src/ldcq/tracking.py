"""MLflow setup: an embedded sqlite store by default, any tracking URI by config or environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldcq.errors import ConfigError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def resolve_uri(configured: str | None) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


class Tracker:
    """One experiment per pipeline; one parent run per invocation, a nested child run per stage."""

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        if self.uri.startswith(("http://", "https://")):
            _check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if self.uri.startswith("sqlite:"):
                location = (Path.cwd() / DEFAULT_ARTIFACTS).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = found.experiment_id
        self.experiment = experiment
        self._open_runs: list[str] = []

    def start_run(self, name: str, tags: Mapping[str, Any], parent: str | None = None) -> str:
        all_tags = {k: str(v) for k, v in tags.items() if v is not None}
        all_tags["mlflow.runName"] = name
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self._open_runs.append(run_id)
        return run_id

    def reopen_run(self, run_id: str) -> str:
        """Mark an ended run running again (a sweep resumed by the same command)."""
        self.client.update_run(run_id, status="RUNNING")
        self._open_runs.append(run_id)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        for k, v in metrics.items():
            self.client.log_metric(run_id, k, float(v), step=step)

    def log_artifact(self, run_id: str, path: str | Path, subdir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), subdir)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
        if run_id in self._open_runs:
            self._open_runs.remove(run_id)

    def end_open_runs(self, status: str = "FAILED") -> None:
        """End every run this tracker started and did not end yet, children before parents
        (a stage that failed, inside or outside ``trainer.fit``, and the pipeline's run)."""
        for run_id in reversed(list(self._open_runs)):
            self.end_run(run_id, status)

    def logger(self, run_id: str):
        """A Lightning logger writing into an existing run."""
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=self.experiment, tracking_uri=self.uri, run_id=run_id)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(
            f"MLflow tracking server {uri} cannot be reached ({exc}); start it, fix "
            f"tracking_uri / MLFLOW_TRACKING_URI, or unset both to use the local sqlite store"
        ) from exc


def check_server(uri: str) -> None:
    """Fail at once, naming ``uri``, when it is an http(s) tracking server that does not answer."""
    if uri.startswith(("http://", "https://")):
        _check_reachable(uri)
