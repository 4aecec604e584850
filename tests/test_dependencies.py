"""dvc.yaml lists, for every stage, exactly the project modules that stage's code runs: the stage's
module and everything it imports from the `stages` package, directly or through other project
modules, read from the source. So editing a module re-runs exactly the stages that import it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

PACKAGE = "stages"


def module_file(name: str) -> str | None:
    """`stages.x` -> `stages/x.py`; `stages` -> `stages/__init__.py`; None outside the package."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    path = Path(*parts).with_suffix(".py") if len(parts) > 1 else Path(PACKAGE, "__init__.py")
    return path.as_posix() if (ROOT / path).exists() else None


def direct_imports(file: str) -> set[str]:
    """Project files `file` imports anywhere in it (functions included), and the package's __init__,
    which Python runs before any of its modules."""
    found = {f"{PACKAGE}/__init__.py"}
    for node in ast.walk(ast.parse((ROOT / file).read_text(), file)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from stages import x` imports the module stages/x.py where there is one
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {path for path in map(module_file, names) if path}
    return found


def code_closure(file: str) -> set[str]:
    """`file` and every project file it reaches through imports."""
    seen, todo = set(), [file]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(direct_imports(current))
    return seen


def stage_code() -> dict[str, tuple[set[str], set[str]]]:
    """stage -> (project files its code needs, project files dvc.yaml lists as its deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: one definition for every item
        [module] = re.findall(r"-m (stages\.\w+)", stage["cmd"])
        listed = {dep for dep in stage.get("deps", []) if dep.startswith(f"{PACKAGE}/")}
        out[name] = (code_closure(module_file(module)), listed)
    return out


def test_every_stage_depends_on_exactly_the_project_code_it_runs():
    wrong = {}
    for stage, (needed, listed) in stage_code().items():
        if needed != listed:
            wrong[stage] = {"missing from dvc.yaml": sorted(needed - listed), "listed but not imported": sorted(listed - needed)}
    assert not wrong, f"dvc.yaml deps differ from the import graph: {wrong}"


def test_the_import_graph_sees_imports_inside_functions_and_through_other_modules():
    # track.py imports pyfuncmodel inside a function
    assert "stages/pyfuncmodel.py" in direct_imports("stages/track.py")
    export = code_closure("stages/export.py")
    assert {"stages/__init__.py", "stages/errors.py", "stages/params.py", "stages/dataformat.py"} <= export
    assert "stages/tracking.py" not in export


def test_every_project_module_is_some_stages_dependency_or_exempt():
    """A module no stage runs is dead code, or the entry point of a command (predict)."""
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / PACKAGE).glob("*.py")}
    used = set().union(*(needed for needed, _ in stage_code().values()))
    assert modules - used - code_closure("stages/predict.py") == set()


def imports_mlflow(file: str) -> bool:
    for node in ast.walk(ast.parse((ROOT / file).read_text(), file)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(name.split(".")[0] == "mlflow" for name in names):
            return True
    return False


def test_only_the_track_stage_imports_mlflow():
    """The stages do their work and write DVC's files; the track stage alone logs them to MLflow."""
    importers = {stage: sorted(f for f in needed if imports_mlflow(f)) for stage, (needed, _) in stage_code().items()}
    assert {stage: files for stage, files in importers.items() if files} == {"track": ["stages/pyfuncmodel.py", "stages/track.py", "stages/tracking.py"]}
