"""Model-side modules import nothing distributed: no torch.distributed, deepspeed, pyspark or wandb."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MODULES = ["seqrec.embeddings", "seqrec.model", "seqrec.losses", "seqrec.metrics"]
FORBIDDEN = ("torch.distributed", "deepspeed", "pyspark", "wandb", "petastorm")

PROBE = """
import json, sys
import torch  # torch itself loads parts of torch.distributed: only what our modules add counts
before = set(sys.modules)
for name in {modules!r}:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_importing_model_modules_loads_nothing_distributed() -> None:
    code = PROBE.format(modules=MODULES)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    added = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(MODULES) <= set(added)
    offenders = [m for m in added if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)]
    assert offenders == []


@pytest.mark.parametrize("module", MODULES)
def test_no_forbidden_import_statements(module: str) -> None:
    path = REPO / (module.replace(".", "/") + ".py")
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            names.append(f"{ast.unparse(node.value)}.distributed")  # torch.distributed.* needs no import
    assert [n for n in names if n.startswith(FORBIDDEN) or n.endswith("torch.distributed")] == [], path
