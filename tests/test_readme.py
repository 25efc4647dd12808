"""The README's promises: its ten-line example runs as written, and its two commands exist."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import tensorscope as ts

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_ten_line_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## The library in ten lines\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    small, model = scope["small"], scope["model"]
    assert ts.count_params(small) <= 0.11 * ts.count_params(model)
    r = ts.evaluate(small, scope["ex"].test_loader(), reference=model)
    assert r["accuracy"] >= scope["ex"].accuracy - 0.03  # 10% of the parameters, after recovery
    assert (tmp_path / "small.pt").exists() and (tmp_path / "small.pt2").exists()


def test_the_two_commands_are_in_the_readme_and_ci_runs_the_test_one():
    assert "bash scripts/explorer.sh" in README and "bash scripts/test.sh" in README
    for script in ("scripts/explorer.sh", "scripts/test.sh", "scripts/setup.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "apps/explorer.py" in (ROOT / "scripts" / "explorer.sh").read_text()


def test_the_plan_in_the_readme_parses():
    doc = re.search(r"```json\n(\{\"tensorscope_plan\".*?)```", README, re.S).group(1)
    plan = ts.Plan.from_json(doc)
    model = ts.examples.build_example("lenet5")
    assert len(plan.validate(model)) == 2
