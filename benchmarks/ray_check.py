"""raygpt's Ray path on one device, as a user runs it: train, the driver killed, resume, eval.

    benchmarks/gpu_ray_check.sh                         # one CUDA GPU (installs Ray first where it is missing)
    python benchmarks/ray_check.py --device cpu         # the same path on a CPU, with the tiny preset

1. A synthetic dataset (train, val and test splits) and a run spec in ``--work``.
2. ``raygpt train`` in a session of its own until its first checkpoint is complete in the run
   folder, then SIGKILL of the driver: Ray's reaper ends the cluster it started; what of that
   session is still alive 5 s later is killed by pid (on a CPU that was Ray's dashboard and
   runtime-env agents, which outlive their raylet by about 30 s).
3. The same command again, with ``train.take_over`` (the dead driver's lease has not expired):
   it resumes from that checkpoint and trains to the end.
4. ``raygpt eval`` of the run: its test loss.
5. The bare step (``raygpt.train.step``, no Ray) at the same shape and compile setting.

Then one table: tokens/s under Ray (the median of the reports after each session's first,
which holds the compilation) against the bare step; each checkpoint's stall and its parts
(the first save of each session apart); where each session's time from ``ray.init`` to its
first step went; each validation's and the samples' seconds and every step whose call kept
the host over a second (a compile or a recompile), with the seconds since the session's
``ray.init``; the resume step; the test loss. ``--json`` gets every figure.

On CUDA (default): gpt2-small, 1024 tokens, micro-batch 32 x 4 accumulation, bf16, compiled,
60 steps, a checkpoint every 20, validation and samples every 30. On CPU: tiny, 64 tokens,
micro-batch 8 x 2, eager, 12 steps, a checkpoint every 4, validation every 6.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from train_step import measure, write_synthetic_dataset  # noqa: E402

from raygpt.storage import Storage  # noqa: E402
from raygpt.weights.checkpoint import latest_checkpoint  # noqa: E402

SHAPES = {
    "cuda": {"preset": "gpt2-small", "seq_len": 1024, "micro_batch": 32, "accumulation": 4, "steps": 60, "every": 20,
             "val_interval": 30, "log_interval": 10, "compile": True, "cpus": 8, "timeout_s": 240},
    "cpu": {"preset": "tiny", "seq_len": 64, "micro_batch": 8, "accumulation": 2, "steps": 12, "every": 4,
            "val_interval": 6, "log_interval": 2, "compile": False, "cpus": 1, "timeout_s": 300},
}
NAME = "ray-check"


def write_spec(work: Path, device: str, shape: dict) -> Path:
    batch_tokens = shape["micro_batch"] * shape["accumulation"] * shape["seq_len"]
    dataset = write_synthetic_dataset(work / "data", train_tokens=(shape["steps"] + 4) * batch_tokens,
                                      val_tokens=4 * batch_tokens, test_tokens=2 * batch_tokens + 1)
    spec = {
        "name": NAME, "storage_path": str(work / "runs"),
        "model": {"preset": shape["preset"]},
        "train": {"dataset": dataset, "seq_len": shape["seq_len"], "global_batch_tokens": batch_tokens,
                  "micro_batch_size": shape["micro_batch"], "max_steps": shape["steps"], "warmup_steps": 5,
                  "lr": 1e-3, "compile": shape["compile"], "use_gpu": device == "cuda", "num_workers": 1,
                  "cpus_per_worker": shape["cpus"], "log_interval": shape["log_interval"],
                  "val_interval": shape["val_interval"], "val_tokens": 2 * batch_tokens},
        "checkpoint": {"interval": shape["every"], "keep": 3},
        "eval": {"dataset": dataset, "batch_size": shape["micro_batch"]},
    }
    path = work / "ray-check.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def raygpt(*args: str, log: Path, num_cpus: int | None) -> subprocess.Popen:
    """``raygpt ARGS`` in a session of its own (its Ray processes join that session)."""
    command = [sys.executable, "-m", "raygpt.cli", *args, *(["--num-cpus", str(num_cpus)] if num_cpus else [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout_s: float, log: Path, what: str) -> None:
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_session(process)
        raise SystemExit(f"ray_check: {what} took over {timeout_s:.0f} s; its log ({log}) ends:\n"
                         + log.read_text()[-3000:])
    if code != 0:
        raise SystemExit(f"ray_check: {what} exited with {code}; its log ({log}) ends:\n" + log.read_text()[-3000:])


def session_pids(session: int) -> list[int]:
    """This check's own processes of one session (``raygpt`` and the Ray processes it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def end_session(process: subprocess.Popen, grace_s: float = 5.0) -> dict:
    """SIGKILL the driver, wait for Ray's reaper to end the rest of its session; returns the
    seconds until none of it was left and what was still alive after ``grace_s`` (then killed
    by pid: a worker left alive would hold the GPU the resumed run needs)."""
    started = time.perf_counter()
    session = process.pid  # start_new_session: the driver leads its own session
    process.kill()
    process.wait()
    while session_pids(session) and time.perf_counter() - started < grace_s:
        time.sleep(0.5)
    survivors = []
    for pid in session_pids(session):
        try:
            survivors.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, FileNotFoundError):
            pass
    while session_pids(session):
        time.sleep(0.2)
    return {"cluster_gone_s": time.perf_counter() - started, "killed_by_pid": survivors}


def kill_after_first_checkpoint(spec: Path, run: Path, shape: dict, log: Path, num_cpus: int | None) -> dict:
    """The first ``raygpt train``, killed once its first checkpoint is complete in the run folder."""
    started = time.perf_counter()
    process = raygpt("train", str(spec), log=log, num_cpus=num_cpus)
    while (latest := latest_checkpoint(str(run), Storage())) is None:
        if process.poll() is not None:
            raise SystemExit(f"ray_check: the first raygpt train exited ({process.returncode}) before its first "
                             f"checkpoint; its log ({log}) ends:\n" + log.read_text()[-3000:])
        if time.perf_counter() - started > shape["timeout_s"]:
            end_session(process)
            raise SystemExit(f"ray_check: no checkpoint {shape['timeout_s']} s after the first raygpt train started; "
                             f"its log ({log}) ends:\n" + log.read_text()[-3000:])
        time.sleep(0.5)
    checkpoint_at = time.perf_counter() - started
    return {"checkpoint": os.path.basename(latest), "checkpoint_after_s": checkpoint_at, **end_session(process)}


def ray_figures(run: Path, shape: dict) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = json.loads((run / "run.json").read_text())
    sessions: list[list[dict]] = []
    for r in records:
        if "resumed_from_step" in r:
            sessions.append([])
        if sessions:
            sessions[-1].append(r)
    speeds = [r["tokens_per_s"] for s in sessions for r in [x for x in s if "tokens_per_s" in x][1:]]
    stalls = [{"step": r["step"], "seconds": r["checkpoint_stall_s"], "parts": r.get("checkpoint_stall_parts"),
               "first_of_session": r["step"] == next(x["step"] for x in s if "checkpoint_stall_s" in x)}
              for s in sessions for r in s if "checkpoint_stall_s" in r]
    timeline = []
    for s in sessions:
        origin = s[0]["attempt_started"]
        for r in s:
            if any(k in r for k in ("val_s", "samples_s", "slow_steps", "checkpoint_stall_s")):
                timeline.append({"step": r["step"], "at_s": r["time"] - origin, "val_s": r.get("val_s"),
                                 "samples_s": r.get("samples_s"), "slow_steps": r.get("slow_steps"),
                                 "stall_s": r.get("checkpoint_stall_s")})
    return {"sessions": len(sessions), "resumed_from": [s[0]["resumed_from_step"] for s in sessions],
            "steps": sorted(int(k) for r in records for k in r.get("step_losses", {})),
            "tokens_per_s": statistics.median(speeds) if speeds else None, "stalls": stalls,
            "startup": record.get("startup"), "status": record.get("status"), "final": record.get("final"),
            "timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", default=None, help="where the data, spec and run go (default: a temporary folder)")
    parser.add_argument("--num-cpus", type=int, default=None, help="for the local Ray instance (default: all)")
    parser.add_argument("--json", default="ray_check.json", help="where the figures go")
    args = parser.parse_args()
    shape = SHAPES[args.device]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raygpt-ray-check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = write_spec(work, args.device, shape)
        run = work / "runs" / NAME
        figures: dict = {"device": args.device, "shape": shape}
        figures["kill"] = kill_after_first_checkpoint(spec, run, shape, work / "train-1.log", args.num_cpus)
        resumed = time.perf_counter()
        finish(raygpt("train", str(spec), "--set", "train.take_over=true", log=work / "train-2.log",
                      num_cpus=args.num_cpus), shape["timeout_s"], work / "train-2.log", "the resumed raygpt train")
        figures["resume_s"] = time.perf_counter() - resumed
        evaluated = time.perf_counter()
        finish(raygpt("eval", str(spec), "--model", NAME, log=work / "eval.log", num_cpus=args.num_cpus), 180,
               work / "eval.log", "raygpt eval")
        figures["eval_s"] = time.perf_counter() - evaluated
        figures["test_loss"] = json.loads((work / "runs" / "eval" / "test_loss.json").read_text())
        figures["ray"] = ray_figures(run, shape)
        import torch  # after the runs: this process holds no GPU memory while they train

        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        if args.device == "cpu":  # as many threads as Ray gave its worker: more thrash a busy machine
            torch.set_num_threads(shape["cpus"])
        figures["bare"] = measure(shape["preset"], device, "auto", shape["micro_batch"], shape["seq_len"],
                                  10 if args.device == "cuda" else 4, 3 if args.device == "cuda" else 1,
                                  shape["compile"], None, work / "bare")
    figures["elapsed_s"] = time.perf_counter() - began
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    show(figures)
    print(f"figures: {args.json}")
    ray_figs = figures["ray"]
    if ray_figs["status"] != "finished" or ray_figs["steps"] != list(range(1, shape["steps"] + 1)):
        raise SystemExit(f"ray_check: the run ended {ray_figs['status']!r} with steps {ray_figs['steps']}")


def show(f: dict) -> None:
    r, bare = f["ray"], f["bare"]
    table = Table(title=f"raygpt's Ray path on {f['device']} ({f['shape']['preset']}, {f['elapsed_s']:.0f} s in all)",
                  title_justify="left")
    table.add_column("what")
    table.add_column("result")
    ratio = r["tokens_per_s"] / bare["tokens_per_s"] if r["tokens_per_s"] else float("nan")
    table.add_row("tokens/s", f"{r['tokens_per_s']:,.0f} under Ray Train against {bare['tokens_per_s']:,.0f} for the "
                              f"bare step ({ratio:.2f}x), micro-batch {f['shape']['micro_batch']} x "
                              f"{f['shape']['accumulation']}, {bare['precision']}"
                              + (", compiled" if f["shape"]["compile"] else ""))
    kill = f["kill"]
    table.add_row("kill and resume", f"{kill['checkpoint']} complete {kill['checkpoint_after_s']:.0f} s after the "
                                     f"first start; driver SIGKILLed, its Ray gone {kill['cluster_gone_s']:.1f} s later"
                                     + (f" ({len(kill['killed_by_pid'])} process(es) killed by pid after 5 s)"
                                        if kill["killed_by_pid"] else "") + "; "
                                     f"resumed from step(s) {r['resumed_from'][1:]}, steps {r['steps'][0]}-"
                                     f"{r['steps'][-1]} all logged, run {r['status']} in {f['resume_s']:.0f} s")
    for s in r["stalls"]:
        parts = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in (s["parts"] or {}).items())
        first = " (a session's first save)" if s["first_of_session"] else ""
        table.add_row(f"checkpoint at step {s['step']}", f"stalled {s['seconds']:.3f} s{first}"
                      + (f": {parts}" if parts else ""))
    startup = r["startup"] or {}
    table.add_row("ray.init to first step", ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s"
                                                      for k, v in startup.items()) + " (the resumed session)")
    for t in r["timeline"]:
        bits = [f"{t['at_s']:.1f} s after its session's start"]
        if t["val_s"] is not None:
            bits.append(f"validation {t['val_s']:.2f} s")
        if t["samples_s"] is not None:
            bits.append(f"samples {t['samples_s']:.2f} s")
        if t["slow_steps"]:
            bits.append("steps over 1 s: " + ", ".join(f"{k} ({v:.1f} s)" for k, v in t["slow_steps"].items()))
        if t["stall_s"] is not None:
            bits.append(f"checkpoint stall {t['stall_s']:.3f} s")
        table.add_row(f"step {t['step']}", "; ".join(bits))
    losses = ", ".join(f"{m['model']} (step {m['step']}) {m['test_loss']:.4f}" for m in f["test_loss"]["results"])
    table.add_row("raygpt eval", f"test loss {losses} over {f['test_loss']['test_tokens']:,} tokens, "
                                 f"{f['eval_s']:.0f} s")
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)


if __name__ == "__main__":
    main()
