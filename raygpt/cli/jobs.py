"""Ray jobs: submit a run spec to a cluster, follow it, and ask after it later.

``raygpt submit jobs/X.yaml`` checks the spec locally, then submits ``raygpt <verb> <spec>``
through Ray's ``JobSubmissionClient`` with a submission id fixed by the stage and run name
(``raygpt-train-gpt2-small-fineweb``), and follows the job's logs. Ctrl-C stops following,
never the job. A fixed id makes a re-submission recognisable: if the run's job is still
running, ``submit`` follows it instead of starting a second one; if it has ended, the new
submission is ``<id>-2``, ``<id>-3``, ... (Ray refuses to reuse an id). Training resumes from
its checkpoints in storage either way, so the same command is also the way back after a
preemption. A training run whose lease a live driver holds (started elsewhere, or by hand)
is refused before anything is submitted (``raygpt.train.lease``).

Only the spec travels with the job (``runtime_env.working_dir``): raygpt itself, and Python,
come from the cluster's image. No credential is ever put in the job: the cluster reads S3
through its instance profile (or the environment its head was started with).

The cluster's auth token (Ray's token authentication, on by default in raygpt's image) is
read from ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH`` names, or
``~/.ray/auth_token``, Ray's own order, and sent as a bearer token.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygpt.config import RunSpec, load_spec
from raygpt.errors import RaygptError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Stages a spec can be submitted as; ``data`` runs ``raygpt data prepare``, ``sweep`` a sweep spec.
VERBS = ("train", "eval", "ift", "judge", "report", "data", "sweep")
ACTIVE = ("PENDING", "RUNNING")
TOKEN_PLACES = "$RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token"


# ---------------------------------------------------------------------------------------------
# Token and client


@dataclass(frozen=True)
class AuthToken:
    value: str = field(repr=False)
    """The token itself: sent as a header, never printed (so not in the repr either)."""
    source: str
    """Where it was found, for messages (never the token itself)."""


def find_auth_token() -> AuthToken | None:
    """The Ray auth token, looked up in Ray's own order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN")
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if explicit:
        path = Path(explicit).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise RaygptError(f"{path}: cannot read the Ray auth token that RAY_AUTH_TOKEN_PATH names "
                              f"({e.strerror})") from None
        if not value:
            raise RaygptError(f"{path}: the Ray auth token file that RAY_AUTH_TOKEN_PATH names is empty")
        return AuthToken(value, f"{path} ($RAY_AUTH_TOKEN_PATH)")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        try:
            value = default.read_text().strip()
        except OSError as e:
            raise RaygptError(f"{default}: cannot read the Ray auth token ({e.strerror})") from None
        if value:
            return AuthToken(value, str(default))
    return None


def resolve_address(address: str | None) -> str:
    """The dashboard URL: ``address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``
    when it is an http(s) URL, else the local default (a ``ray dashboard`` port-forward)."""
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (env_address if env_address.startswith(("http://", "https://")) else None)
               or DEFAULT_ADDRESS)
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise RaygptError(f"--address {address}: jobs are submitted to the dashboard's HTTP address, "
                          "e.g. http://127.0.0.1:8265 (after `ray dashboard cluster.yaml`)")
    return address.rstrip("/")


def job_client(address: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for the cluster at ``address`` that sends the auth token.

    The token goes in as an explicit ``Authorization`` header, so it works whatever this
    process's ``RAY_AUTH_MODE`` is and whichever token a local Ray instance of ours uses.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    with explained(url, token):
        # Its version check is an authenticated request: a wrong or missing token fails here.
        return JobSubmissionClient(url, headers=headers)


class explained:
    """Turns the job client's connection and auth failures into one ``RaygptError``."""

    def __init__(self, url: str, token: AuthToken | None, job_id: str | None = None):
        self.url, self.token, self.job_id = url, token, job_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, (RaygptError, KeyboardInterrupt)):
            return False
        from ray.exceptions import AuthenticationError

        if isinstance(exc, AuthenticationError):
            if self.token is None:
                raise RaygptError(f"{self.url}: the cluster requires an auth token and none was found: "
                                  f"put it in {TOKEN_PLACES} (see docs/cluster.md)") from None
            raise RaygptError(f"{self.url}: the cluster refused the auth token from {self.token.source}: "
                              f"it expects its own token in {TOKEN_PLACES}; on a `ray up` cluster that "
                              "is the ~/.ray/auth_token the cluster was started with") from None
        if isinstance(exc, ConnectionError) or type(exc).__module__.startswith(("requests", "aiohttp")):
            raise RaygptError(f"{self.url}: no Ray dashboard answers there: start the cluster (`ray up cluster.yaml`), "
                              "forward its dashboard (`ray dashboard cluster.yaml`), or pass --address / "
                              "set RAY_ADDRESS") from None
        if isinstance(exc, RuntimeError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"job {self.job_id}" if self.job_id else self.url
            raise RaygptError(f"{where}: {first[:400]}") from None
        return False


# ---------------------------------------------------------------------------------------------
# Submission


def verb_for(spec_path: Path, verb: str | None) -> str:
    """``verb``, else the stage the file name starts with (``eval-test-loss.yaml`` -> eval), else train."""
    if verb:
        if verb not in VERBS:
            raise RaygptError(f"--verb {verb}: expected one of {', '.join(VERBS)}")
        return verb
    first = re.split(r"[-_.]", spec_path.name, maxsplit=1)[0]
    return first if first in VERBS else "train"


def submission_id_for(verb: str, run_name: str) -> str:
    """``raygpt-<verb>-<run name>``, restricted to letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"raygpt-{verb}-{run_name}").strip("-")


def entrypoint_for(verb: str, spec_relpath: str, overrides: list[str]) -> str:
    command = ["raygpt", "data", "prepare"] if verb == "data" else ["raygpt", verb]
    command.append(spec_relpath)
    for item in overrides:
        command += ["--set", item]
    return shlex.join(command)


def _suffix(job_id: str, base: str) -> int | None:
    """1 for ``base`` itself, n for ``base-n``, None for anything else."""
    if job_id == base:
        return 1
    match = re.fullmatch(re.escape(base) + r"-(\d+)", job_id)
    return int(match.group(1)) if match else None


def previous_submissions(client: Any, base: str) -> list[Any]:
    """Jobs submitted for ``base`` on this cluster, oldest first."""
    jobs = [job for job in client.list_jobs() if job.submission_id and _suffix(job.submission_id, base)]
    return sorted(jobs, key=lambda job: _suffix(job.submission_id, base))


def next_submission_id(base: str, previous: list[Any]) -> str:
    if not previous:
        return base
    return f"{base}-{max(_suffix(job.submission_id, base) for job in previous) + 1}"


def stage_working_dir(spec_path: Path, working_dir: str | None, staging: Path,
                      also: tuple[Path, ...] = ()) -> tuple[Path, str]:
    """The folder to upload and the spec's path inside it.

    By default only the spec is uploaded (with ``also``: the files it reads, a sweep's base
    run spec), each at the same relative path it has here, so the job runs ``raygpt train
    jobs/X.yaml`` like the plain ``ray job submit`` does. ``working_dir`` uploads a whole
    folder instead, for specs that read local files; the spec must be in it.
    """
    spec_path = spec_path.absolute()
    if working_dir:
        root = Path(working_dir).absolute()
        if not root.is_dir():
            raise RaygptError(f"--working-dir {working_dir}: not a directory")
        for path in (spec_path, *(p.absolute() for p in also)):
            if not path.is_relative_to(root):
                raise RaygptError(f"{path}: the spec and the files it names must be inside --working-dir {root}")
        return root, spec_path.relative_to(root).as_posix()
    try:
        relpath = spec_path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        relpath = spec_path.name
    for path in also:
        try:
            other = path.absolute().relative_to(Path.cwd()).as_posix()
        except ValueError:
            raise RaygptError(f"{path}: outside the current folder, so the job could not find it at the same "
                              "path: submit from a folder that holds it, or pass --working-dir") from None
        (staging / other).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staging / other)
    (staging / relpath).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, staging / relpath)
    return staging, relpath


def cluster_local_paths(spec: RunSpec, verb: str) -> list[str]:
    """The spec's relative local paths that this stage reads or writes. On the cluster they
    resolve inside the job's temporary working directory, where nothing outlives the job."""
    keys = {"storage_path": spec.storage_path}
    keys.update({
        "sweep": {"train.dataset": spec.train.dataset},
        "train": {"train.dataset": spec.train.dataset},
        "eval": {"eval.dataset": spec.eval.dataset, "eval.output": spec.eval.output},
        "ift": {"ift.output": spec.ift.output},
        "judge": {"judge.output": spec.judge.output},
        "report": {"report.output": spec.report.output},
        "data": {"data.output": spec.data.output},
    }[verb])
    return [f"{key}: {value}" for key, value in keys.items()
            if value and "://" not in value and not Path(value).expanduser().is_absolute()]


def submit_command(args) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    spec_path = Path(args.spec)
    sweep = _sweep_of(spec_path, args)
    # A bad spec fails here, before anything is sent (a sweep: every one of its runs' specs).
    spec = sweep.stage_spec if sweep else load_spec(spec_path, args.overrides)
    verb = "sweep" if sweep else verb_for(spec_path, args.stage)
    url = resolve_address(args.address)
    token = find_auth_token()
    client = job_client(url)
    base = submission_id_for(verb, spec.name)

    with explained(url, token):
        previous = previous_submissions(client, base)
    active = [job for job in previous if str(job.status) in ACTIVE]
    if active:
        job_id = active[-1].submission_id
        console.print(f"[yellow]{job_id} is already {active[-1].status} on {url}: following it instead of "
                      f"submitting twice[/] (stop it with `raygpt jobs stop {job_id}` to submit anew)")
    else:
        if verb == "train":
            check_run_free(spec, console)
        job_id = next_submission_id(base, previous)
        for warning in cluster_local_paths(spec, verb):
            console.print(f"[yellow]warning:[/] {warning} is a local path on the cluster, inside the job's "
                          "temporary working directory; use s3:// to keep what it writes")
        with tempfile.TemporaryDirectory(prefix="raygpt-submit-") as staging:
            also = (Path(sweep.base_path),) if sweep else ()
            working_dir, relpath = stage_working_dir(spec_path, getattr(args, "working_dir", None), Path(staging), also)
            entrypoint = entrypoint_for(verb, relpath, args.overrides)
            with explained(url, token, job_id):
                submit_when_ready(client, console, entrypoint=entrypoint, submission_id=job_id,
                                  runtime_env={"working_dir": str(working_dir)},
                                  metadata={"raygpt_verb": verb, "raygpt_run": spec.name, "raygpt_spec": relpath})
    try:  # from here on the job exists: Ctrl-C detaches from it, whenever it comes
        if not active:
            console.print(f"submitted [bold]{job_id}[/] to {url}: {entrypoint}")
        if args.no_follow:
            console.print(f"follow it with `raygpt jobs logs {job_id} --follow`")
            return 0
        return follow(client, url, token, job_id, console)
    except KeyboardInterrupt:
        return _detached(job_id, console)


def _sweep_of(spec_path: Path, args) -> Any:
    """The sweep a sweep spec describes (``--verb sweep`` or a file with a ``sweep:`` section),
    every run's spec checked; None for a run spec."""
    from raygpt.sweep.spec import is_sweep_file, load_sweep

    if args.stage not in (None, "sweep") or not (args.stage == "sweep" or is_sweep_file(spec_path)):
        return None
    return load_sweep(spec_path, args.overrides)


def check_run_free(spec: RunSpec, console: Any) -> None:
    """Refuse to submit a training run whose lease a live driver holds (the job's own driver
    checks again). A store this machine cannot read is the cluster's business: a warning."""
    from dataclasses import replace

    from raygpt.storage import Storage, is_remote, join
    from raygpt.train.lease import RunLeasedError, check_free

    if not is_remote(spec.storage_path) or spec.train.take_over:
        return
    storage = replace(Storage.from_config(spec.storage), retry_minutes=0.0)
    try:
        check_free(spec.name, join(spec.storage_path, spec.name), storage)
    except RunLeasedError:
        raise
    except RaygptError as e:
        console.print(f"[yellow]warning:[/] cannot check whether run {spec.name} is being trained already ({e}); "
                      "the job's driver checks again")


def submit_when_ready(client: Any, console: Any, timeout_s: float = 60.0, **job: Any) -> None:
    """``client.submit_job(**job)``, waiting while a freshly started head has no job agent yet
    (Ray answers 500 "No available agent" for the first seconds after `ray up`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            console.print("the head's job agent is still starting; retrying in 2 s", style="dim")
            time.sleep(2)


def _detached(job_id: str, console: Any) -> int:
    console.print(f"\n[yellow]detached: {job_id} is still running on the cluster.[/]\n"
                  f"  follow again:  raygpt jobs logs {job_id} --follow\n"
                  f"  status:        raygpt jobs status {job_id}\n"
                  f"  stop it:       raygpt jobs stop {job_id}")
    return 0


# ---------------------------------------------------------------------------------------------
# Following, status, logs, stop


def follow(client: Any, url: str, token: AuthToken | None, job_id: str, console: Any) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded. Ctrl-C detaches and leaves it running."""
    started = time.monotonic()
    try:
        try:
            with console.status(f"{job_id}: following logs (Ctrl-C detaches; the job keeps running)") as status:
                asyncio.run(_stream_logs(client, job_id, console, status, started))
        except RuntimeError as e:
            # The log stream breaks when the head goes away (a preempted cluster) or the job is gone.
            console.print(f"[red]lost the log stream of {job_id}: {str(e).splitlines()[0] if str(e) else e!r}[/]")
        with explained(url, token, job_id):
            info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        return _detached(job_id, console)
    return report_end(info, job_id, time.monotonic() - started, console)


async def _stream_logs(client: Any, job_id: str, console: Any, status: Any, started: float) -> None:
    pending = ""
    async for chunk in client.tail_job_logs(job_id):
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            console.out(line, highlight=False)
        status.update(f"{job_id}: running for {time.monotonic() - started:,.0f} s (Ctrl-C detaches; the job keeps running)")
    if pending:
        console.out(pending, highlight=False)


def report_end(info: Any, job_id: str, elapsed_s: float, console: Any) -> int:
    state = str(info.status)
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(state, "cyan")
    # Ray appends the last logs to a failed job's message; they were just shown above.
    first_line = (info.message or "").strip().splitlines()[0] if (info.message or "").strip() else ""
    message = f": {first_line.rstrip(',:')}" if first_line and state != "SUCCEEDED" else ""
    console.print(f"[{colour}]{job_id} {state}[/] after {elapsed_s:,.0f} s{message}")
    if state == "FAILED":
        console.print(f"  all logs: raygpt jobs logs {job_id}")
    return 0 if state == "SUCCEEDED" else 1


def resolve_job_id(client: Any, job_ref: str, verb: str | None = None) -> str:
    """A submission id, or a spec path standing for its run's latest submission."""
    path = Path(job_ref)
    if job_ref.endswith((".yaml", ".yml")) and path.is_file():
        spec = load_spec(path)
        base = submission_id_for(verb_for(path, verb), spec.name)
        previous = previous_submissions(client, base)
        if not previous:
            raise RaygptError(f"{job_ref}: no job {base} (or {base}-N) on this cluster; submit it with "
                              f"`raygpt submit {job_ref}`")
        return previous[-1].submission_id
    return job_ref


def jobs_command(args) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    url = resolve_address(args.address)
    token = find_auth_token()
    client = job_client(url)
    if args.action == "list":
        with explained(url, token):
            print_jobs(client.list_jobs(), console)
        return 0
    if not args.job_id:
        raise RaygptError(f"jobs {args.action}: name the job: a submission id (see `raygpt jobs list`) or its spec file")
    with explained(url, token, args.job_id):
        job_id = resolve_job_id(client, args.job_id)
    with explained(url, token, job_id):
        if args.action == "status":
            info = client.get_job_info(job_id)
            print_jobs([info], console)
            return 0 if str(info.status) in ("SUCCEEDED", *ACTIVE) else 1
        if args.action == "logs":
            if getattr(args, "follow", False):
                return follow(client, url, token, job_id, console)
            console.out(client.get_job_logs(job_id), end="", highlight=False)
            return 0
        if args.action == "stop":
            stopped = client.stop_job(job_id)
            console.print(f"{job_id}: {'stop requested' if stopped else 'not running; nothing to stop'}")
            return 0
    raise RaygptError(f"jobs {args.action}: unknown action")


def print_jobs(jobs: list[Any], console: Any) -> None:
    from rich.table import Table

    if not jobs:
        console.print("no jobs on this cluster")
        return
    table = Table(box=None, header_style="bold")
    for column in ("submission id", "status", "started", "duration"):
        table.add_column(column, no_wrap=True)
    table.add_column("entrypoint / message", overflow="fold")
    colours = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan", "PENDING": "cyan"}
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        state = str(job.status)
        started = time.strftime("%b %d %H:%M", time.localtime(job.start_time / 1000)) if job.start_time else ""
        end = job.end_time or (time.time() * 1000 if job.start_time else None)
        duration = f"{(end - job.start_time) / 1000:,.0f} s" if job.start_time and end else ""
        lines = (job.message or "").strip().splitlines()
        detail = job.entrypoint if state in ("SUCCEEDED", *ACTIVE) or not lines else f"{job.entrypoint}\n{lines[0]}"
        table.add_row(job.submission_id or job.job_id or "", f"[{colours.get(state, 'white')}]{state}[/]", started,
                      duration, detail)
    console.print(table)
