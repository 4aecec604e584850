"""Rewrite the `stages/*.py` deps of every stage in dvc.yaml to its import closure, as
tests/test_dependencies.py computes it (`code_closure`): the stage's own module first, then the
rest sorted. Every other line of dvc.yaml is left as it is. Run after changing imports:

    python scripts/sync_code_deps.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_dependencies import code_closure, module_file, stage_code  # noqa: E402

STAGE = re.compile(r"^  (\w[\w-]*):")  # a stage's name, two spaces in under `stages:`
CODE_DEP = re.compile(r"^(\s*)- stages/\w+\.py\s*$")


def wanted(dvc_yaml: str) -> dict[str, list[str]]:
    """stage -> its code deps in dvc.yaml's order: own module, then the rest sorted."""
    order = {}
    for name in stage_code():
        [module] = re.findall(r"-m (stages\.\w+)", re.search(rf"(?ms)^  {name}:.*?cmd: ([^\n]+)", dvc_yaml).group(1))
        own = module_file(module)
        order[name] = [own] + sorted(code_closure(own) - {own})
    return order


def main() -> None:
    path = ROOT / "dvc.yaml"
    text = path.read_text()
    deps = wanted(text)
    out, stage, written = [], None, set()
    for line in text.splitlines(keepends=True):
        if match := STAGE.match(line):
            stage = match.group(1)
        if (match := CODE_DEP.match(line)) and stage in deps:
            if stage not in written:  # the first code dep of the stage: write the whole list here
                out.extend(f"{match.group(1)}- {dep}\n" for dep in deps[stage])
                written.add(stage)
            continue
        out.append(line)
    new = "".join(out)
    if new != text:
        path.write_text(new)
    print("dvc.yaml: code deps " + ("rewritten" if new != text else "already match the imports"))


if __name__ == "__main__":
    main()
