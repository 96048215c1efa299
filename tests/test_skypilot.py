"""The SkyPilot managed-job file loads with SkyPilot's own loader (schema-checked, offline).

SkyPilot pins click below 8.2, which the Hugging Face libraries raygpt uses have outgrown, so
it lives in a virtual environment of its own: ``$RAYGPT_SKYPILOT_PYTHON`` names its Python
(``.ci/run`` makes it, as ``.venv-sky``). Without one the test is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("RAYGPT_SKYPILOT_PYTHON") or str(REPO / ".venv-sky" / "bin" / "python")

LOAD = """
import json, sys
import sky
task = sky.Task.from_yaml(sys.argv[1])
print(json.dumps({"name": task.name, "num_nodes": task.num_nodes, "envs": task.envs, "run": task.run,
                  "resources": [{"use_spot": r.use_spot, "accelerators": r.accelerators,
                                 "image": list(r.image_id.values()) if r.image_id else None,
                                 "recovery": r.job_recovery} for r in task.resources]}))
"""

pytestmark = pytest.mark.skipif(not Path(PYTHON).exists(), reason="no SkyPilot environment (RAYGPT_SKYPILOT_PYTHON)")


def load(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=120)


def test_the_managed_job_runs_the_image_and_the_run_spec_on_spot_gpus():
    result = load(REPO / "sky-train.yaml")
    assert result.returncode == 0, result.stderr
    task = json.loads(result.stdout.strip().splitlines()[-1])
    assert task["name"] == "raygpt-train" and task["num_nodes"] == 1
    assert task["envs"]["RUN_SPEC"] == "jobs/train-gpt2-small-fineweb.yaml"
    assert (REPO / task["envs"]["RUN_SPEC"]).is_file()
    assert 'raygpt train "$RUN_SPEC"' in task["run"]
    assert {next(iter(r["accelerators"])) for r in task["resources"]} == {"H100", "A100-80GB", "A100"}
    for r in task["resources"]:
        assert r["use_spot"] and list(r["accelerators"].values()) == [8]
        assert r["image"] == ["docker:ghcr.io/YOUR-ORG/raygpt:0.1.0"]
        assert r["recovery"]["strategy"] == "EAGER_NEXT_REGION"
    assert "AWS_SECRET_ACCESS_KEY: null" in (REPO / "sky-train.yaml").read_text()  # a secret, never a value


def test_the_loader_is_a_real_check(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO / "sky-train.yaml").read_text().replace("use_spot: true", "use_spots: true"))
    result = load(broken)
    assert result.returncode != 0 and "use_spots" in result.stderr
