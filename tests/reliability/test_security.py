"""Security: weights are loaded as data only, no pickles of classes, YAML loaded safely, the MLflow
UI bound to 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
from tiny import PIPELINE

from ldcq.cli import main
from ldcq.config import compose
from ldcq.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "src" / "ldcq").rglob("*.py"))


def _calls(name: str):
    """``(file, call)`` of every call of ``<anything>.name(...)`` or ``name(...)`` in src/."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def _keyword(call: ast.Call, name: str):
    kw = next((k for k in call.keywords if k.arg == name), None)
    return kw.value.value if kw is not None and isinstance(kw.value, ast.Constant) else None


def test_every_torch_load_and_resume_reads_weights_only():
    loads = list(_calls("load"))
    torch_loads = [
        (p, c)
        for p, c in loads
        if isinstance(c.func, ast.Attribute) and ast.unparse(c.func) == "torch.load"
    ]
    assert torch_loads, "the scan found no torch.load at all"
    for path, call in torch_loads:
        assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
    for path, call in _calls("fit"):
        if any(k.arg == "ckpt_path" for k in call.keywords):
            assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"


def test_no_pickling_modules_and_no_unsafe_yaml():
    banned = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & banned, f"{path}:{node.lineno} imports {names & banned}"
        text = path.read_text()
        for unsafe in ("yaml.load(", "yaml.unsafe_load", "yaml.Loader", "yaml.FullLoader"):
            assert unsafe not in text, f"{path} uses {unsafe}"


def test_yaml_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = f'!!python/object/apply:os.system ["touch {marker}"]'
    (tmp_path / "configs").mkdir()
    shutil.copytree(REPO / "configs", tmp_path / "configs", dirs_exist_ok=True)
    (tmp_path / "pipelines").mkdir()
    pipeline = tmp_path / "pipelines" / "evil.yaml"
    pipeline.write_text(PIPELINE.read_text() + f"seed: {evil}\n")
    with pytest.raises(ConfigError, match="cannot read pipeline"):
        compose(pipeline)

    stage_config = tmp_path / "stage.yaml"
    stage_config.write_text(f"model:\n  beta: {evil}\n")
    assert main(["vae", "fit", "--config", str(stage_config)]) == 2
    assert "ldcq: error:" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_mlflow_ui_listens_on_localhost_unless_asked():
    def command(*args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "mlflow-ui", *args], cwd=REPO, capture_output=True, text=True
        )
        return next(line for line in out.stdout.splitlines() if "mlflow ui" in line)

    assert "--host 127.0.0.1 " in command()
    assert "--host 0.0.0.0 " in command("MLFLOW_HOST=0.0.0.0")
