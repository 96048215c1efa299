"""Fuzzed run specs and flags: every one is accepted or gives one clear error, before Ray starts.

A few hundred mutations (fixed seed) of a valid spec and of the flags of ``raygpt train``,
``eval``, ``data prepare``, ``judge --dry-run`` and ``report``: wrong types and unknown keys
at every level, negative, zero, huge and non-finite numbers, empty, binary and oversized
files, lists for mappings, deep nesting, malformed ``--set``, URIs of other schemes or
without a bucket. Each runs the CLI's ``main`` in this process with the stage itself
replaced by a stub, so what is exercised is what a command does before its stage (and Ray)
starts: argparse, the flag checks and ``load_spec``. A case passes when ``main`` returns 0
with a spec that passes validation, or 2 with one ``raygpt VERB: error:`` line naming the
problem; any other exception, or more than a few seconds, fails it.

Accepted on purpose (about 50 of the cases are, with this seed):

- Any string without a scheme is a local path: ``' '``, ``'\u202e'`` or a 5,000-character
  name is a folder name to ``load_spec``; the OS judges it on first use, and the storage seam
  turns its OSError into one RaygptError naming the path.
- Registry names (``model.preset``, ``train.schedule``, ``train.parallel``, ``ift.prompt_style``)
  are not checked by ``load_spec``: the registries sit above ``raygpt.config`` in the layers.
  ``raygpt train`` checks them (``config_from_spec``, ``plan_run``) before it connects to Ray.
- Any finite float: ``train.preemption_check_s: 9.2e18`` is a valid, if useless, setting.
- A spec cut short that is still valid YAML is a valid (shorter) spec.
- A FIFO as the spec path blocks in ``open`` until something writes to it, like ``cat``;
  regular files and character devices (``/dev/zero``) are read up to the size limit.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import signal
import subprocess
import sys
import traceback
import typing
from pathlib import Path

import pytest
import yaml

import raygpt.data.prepare
import raygpt.evaluate
import raygpt.judge.run
import raygpt.report
import raygpt.train.launch
from raygpt.cli import main
from raygpt.config import RunSpec, check_spec

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "tests" / "specs" / "train-tiny.yaml").read_text())
BASE["storage_path"] = "runs"  # local: nothing is written (the stages are stubs), and no S3 is needed
BASE["train"]["dataset"] = "data/tiny"
SECTIONS = typing.get_type_hints(RunSpec)
CASE_TIME_LIMIT_S = 5


class Raw(str):
    """A value written into the YAML text as it is (a 5000-digit number, a tag, deep nesting)."""


DEEP = "[" * 200 + "]" * 200
BAD_VALUES = [
    None, "", "x", True, -1, 0, -(2**31), 2**63, 2**70, 1.5, -0.0, 1e-300, float("nan"), float("inf"), float("-inf"),
    [], [1, 2], ["a", 3], {}, {"a": 1}, "s3:///x.json", "s3://ab/x", "S3://bucket/x", "s3:/bucket/x", "gs://b/x",
    "http://h/x", "ftp://h:21", "file:///tmp/x", "..", ".", "a/b", "a\nb", "a\x00b", " ", "\u202e", "x" * 5000,
    Raw("9" * 5000), Raw("-" + "9" * 4000), Raw(DEEP), Raw("2024-13-45"), Raw("!!binary AAAA"), Raw("&a [*a]"),
    Raw("1e400"), Raw(".NaN"), Raw("0x1F"), Raw("0o777"), Raw("1_000"), Raw("!!str 1"), Raw("~"),
]
BAD_SETS = [
    "=1", "train", "train.lr", ".=1", "train..lr=1", "train.lr.x=1", "train.lr=[", "train.lr={", "name.x=1",
    "train.seed=" + "9" * 5000, "train.dataset=" + DEEP, "train.lr=!!binary AAAA", "train.lr=&a [*a]",
    "name=..", "name=.", "name=a/b", "storage_path=gs://b/x", "storage_path=S3://b/x", "storage_path=s3:/b/x",
    "train.lr=.nan", "train.lr=.inf", "train.beta1=5", "train.beta2=-1", "train.seed=1180591620717411303424",
    "train.grad_clip=.nan", "train.weight_decay=.inf", "judge.timeout_s=.nan", "judge.temperature=.inf",
    "storage.endpoint_url=ftp://h:21", "judge.answers=[s3:///x.json]", "=", "a=b=c", "train.num_workers=[1]",
    "train.num_workers=[3, 1]", "train=[1]", "train=5", "log.trackers=[tensorboard, tensorboard]",
]
COMMANDS = {
    "train": ["--num-cpus", "--address"],
    "eval": ["--num-cpus", "--address", "--model"],
    "data prepare": ["--tokens", "--num-proc", "--output", "--source"],
    "judge --dry-run": ["--answers"],
    "report": ["--output"],
}
BAD_FLAG_VALUES = ["-4", "0", "abc", "", "9" * 5000, "garbage", "http://x:8265", "ray://x", "127.0.0.1:0",
                   "gs://b/x", "S3://b/x", "s3:///x", "..", "a\nb", "1e400"]


def leaf_keys(section: type, prefix: str) -> list[str]:
    return [f"{prefix}{name}" for name in section.__dataclass_fields__]


ALL_KEYS = ["name", "storage_path"] + [key for name, tp in SECTIONS.items() if name not in ("name", "storage_path")
                                       for key in leaf_keys(tp, f"{name}.")]


def with_value(spec: dict, key: str, value) -> dict:
    spec = copy.deepcopy(spec)
    node = spec
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return spec


def dump(spec) -> str:
    """YAML text of a mutated spec, each Raw value put in as written."""
    raws: dict[str, str] = {}

    def mark(value):
        if isinstance(value, Raw):
            raws[f"RAW{len(raws)}"] = value
            return f"RAW{len(raws) - 1}"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = yaml.safe_dump(mark(spec), allow_unicode=True, width=1 << 20)
    for token, raw in raws.items():
        text = text.replace(token, raw)
    return text


def spec_cases(rng: random.Random) -> list[tuple[str, bytes, list[str]]]:
    """(what, file bytes, extra argv) mutations of the spec file."""
    cases = []
    for key in ALL_KEYS:  # every field once, with a random bad value
        value = rng.choice(BAD_VALUES)
        cases.append((f"{key}={value!r:.40}", dump(with_value(BASE, key, value)).encode(), []))
    for _ in range(60):  # more random (key, value) pairs
        key, value = rng.choice(ALL_KEYS), rng.choice(BAD_VALUES)
        cases.append((f"{key}={value!r:.40}", dump(with_value(BASE, key, value)).encode(), []))
    for section in [""] + [f"{name}." for name in SECTIONS if name not in ("name", "storage_path")]:
        cases.append((f"unknown key under {section or '<top>'}",
                      dump(with_value(BASE, f"{section}no_such_key", 1)).encode(), []))
    for name in SECTIONS:  # a section (or the top-level values) as a list, a number, a string
        cases.append((f"{name} as a list", dump(with_value(BASE, name, [1, {"a": 2}])).encode(), []))
        cases.append((f"{name} as a scalar", dump(with_value(BASE, name, rng.choice([3, "x", True]))).encode(), []))
    text = dump(BASE).encode()
    cases += [
        ("empty file", b"", []), ("only a comment", b"# nothing\n", []), ("a list", b"- 1\n- 2\n", []),
        ("a string", b"just text\n", []), ("a number", b"42\n", []), ("null", b"~\n", []),
        ("not UTF-8", b"name: \xff\xfe\x00bad\n", []), ("UTF-16", dump(BASE).encode("utf-16"), []),
        ("binary", bytes(rng.randrange(256) for _ in range(4096)), []),
        ("NUL bytes", text[:40] + b"\x00" * 10 + text[40:], []),
        ("nested 10,000 deep (flow)", b"a: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", []),
        ("nested 3,000 deep (block)", "".join("  " * i + f"k{i}:\n" for i in range(300)).encode() * 1, []),
        ("larger than 1 MiB", b"# " + b"x" * (1 << 20) + b"\n", []),
        ("a 5000-digit number", b"train:\n  seed: " + b"7" * 5000 + b"\n", []),
        ("unhashable key", b"? [a, b]\n: 1\n", []), ("duplicate anchors", b"a: &x 1\nb: &x 2\nc: *x\n", []),
        ("undefined alias", b"train: *nowhere\n", []), ("tabs", b"train:\n\tlr: 1\n", []),
        ("python tag", b"name: !!python/object:os.system ls\n", []),
        ("merge key", b"base: &b {lr: 1}\ntrain:\n  <<: *b\n", []),
        ("recursive alias", b"train: &t\n  x: *t\n", []),
    ]
    for _ in range(25):  # bytes flipped or the text cut anywhere
        cut = rng.randrange(len(text))
        flipped = bytearray(text)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        cases.append((f"cut at {cut}", text[:cut], []))
        cases.append(("bytes flipped", bytes(flipped), []))
    return cases


def flag_cases(rng: random.Random) -> list[tuple[str, list[str]]]:
    """(command, flags) mutations of the command line."""
    cases = [(rng.choice(list(COMMANDS)), ["--set", item]) for item in BAD_SETS]
    for command, flags in COMMANDS.items():
        for flag in flags:
            for value in rng.sample(BAD_FLAG_VALUES, 6):
                cases.append((command, [flag, value]))
    for _ in range(30):
        command = rng.choice(list(COMMANDS))
        cases.append((command, ["--set", rng.choice(BAD_SETS), "--set", rng.choice(BAD_SETS)]))
    return cases


@pytest.fixture
def stub_stages(monkeypatch):
    """Every stage replaced by a stub that checks the spec it is given and starts nothing."""
    received = []

    def stage(spec, *args, **kwargs):
        assert isinstance(spec, RunSpec) and check_spec(spec) == []
        received.append(spec)
        return {"uri": "stub"}

    monkeypatch.setattr(raygpt.train.launch, "train", stage)
    monkeypatch.setattr(raygpt.data.prepare, "prepare", stage)
    monkeypatch.setattr(raygpt.judge.run, "run_judge", stage)
    monkeypatch.setattr(raygpt.report, "build_report", stage)
    monkeypatch.setattr(raygpt.report, "render_terminal", lambda *args: None)
    monkeypatch.setattr(raygpt.report, "write_report", lambda *args: [])
    for task in list(raygpt.evaluate.EVAL_TASKS):
        monkeypatch.setitem(raygpt.evaluate.EVAL_TASKS, task, (stage, lambda *args: None))
    return received


class TookTooLong(Exception):
    pass


def _alarm(signum, frame):
    raise TookTooLong()


def run_case(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` under a time limit: (exit status, stderr); an unexpected exception fails."""
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIME_LIMIT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: a flag of the wrong type
                code = e.code
    except TookTooLong:
        pytest.fail(f"{argv!r:.300}: still running after {CASE_TIME_LIMIT_S} s")
    except Exception:
        pytest.fail(f"{argv!r:.300}: raised\n{traceback.format_exc()[-2000:]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def assert_accepted_or_one_error(argv: list[str], code: int, stderr: str) -> None:
    assert code in (0, 2), f"{argv!r:.300}: exit {code}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, f"{argv!r:.300}\n{stderr[-2000:]}"
    if code == 2:
        errors = [line for line in stderr.splitlines() if line.startswith("raygpt ") and ": error: " in line]
        assert len(errors) == 1, f"{argv!r:.300}\n{stderr[-2000:]}"


def verb_argv(command: str, spec: str | None) -> list[str]:
    verb, *rest = command.split()
    return ([verb, *rest[:1]] if verb == "data" else [verb]) + ([spec] if spec else []) + \
        [flag for flag in rest if flag.startswith("--dry")]


def test_fuzzed_specs_and_flags_fail_cleanly_before_ray(stub_stages, tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called during the fuzz")

    was_initialized = ray.is_initialized()  # other tests of the session may hold a local instance
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)  # whatever a stub-free path might write lands here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rng = random.Random(13)
    outcomes = {0: 0, 2: 0}
    spec_file = tmp_path / "spec.yaml"
    for what, data, extra in spec_cases(rng):
        spec_file.write_bytes(data)
        command = rng.choice(list(COMMANDS))
        argv = verb_argv(command, str(spec_file)) + extra
        code, stderr = run_case(argv)
        assert_accepted_or_one_error([what, *argv], code, stderr)
        outcomes[code] += 1
    spec_file.write_bytes(dump(BASE).encode())
    for command, flags in flag_cases(rng):
        argv = verb_argv(command, str(spec_file)) + flags
        code, stderr = run_case(argv)
        assert_accepted_or_one_error(argv, code, stderr)
        outcomes[code] += 1
    assert ray.is_initialized() == was_initialized
    print(f"fuzzed cases: {outcomes[0]} accepted, {outcomes[2]} one clear error")
    assert sum(outcomes.values()) >= 300 and outcomes[2] > 200 and outcomes[0] > 0, outcomes


# Each of these was a traceback, a hang, a failure after Ray started or a silent acceptance (issue 13).
MUST_FAIL = [
    ("train", ["--num-cpus", "-4"], "--num-cpus"), ("train", ["--address", "garbage"], "--address"),
    ("eval", ["--address", "garbage"], "--address"),
    ("train", ["--set", "train.seed=" + "9" * 5000], "train.seed"),
    ("train", ["--set", "storage.endpoint_url=ftp://h:21"], "storage.endpoint_url"),
    ("judge --dry-run", ["--set", "judge.answers=[s3:///x.json]"], "judge.answers[0]"),
    ("judge --dry-run", ["--answers", "s3:///x.json"], "--answers"),
    ("train", ["--set", "train.lr=.nan"], "train.lr"), ("train", ["--set", "train.beta1=5"], "train.beta1"),
    ("train", ["--set", "train.beta2=-1"], "train.beta2"),
    ("train", ["--set", "train.seed=1180591620717411303424"], "train.seed"),
    ("train", ["--set", "train.lr=.inf"], "train.lr"), ("train", ["--set", "train.weight_decay=.inf"], "weight_decay"),
    ("train", ["--set", "train.grad_clip=.nan"], "train.grad_clip"),
    ("train", ["--set", "name=.."], "name"), ("train", ["--set", "name=."], "name"),
    ("train", ["--set", 'name="a\\nb"'], "name"),
    ("train", ["--set", "storage_path=s3:/bucket/runs"], "storage_path"),
    ("train", ["--set", "storage_path=S3://bucket/runs"], "storage_path"),
    ("train", ["--set", "storage_path=gs://bucket/runs"], "storage_path"),
    ("train", ["--set", "storage_path=http://host/runs"], "storage_path"),
    ("judge --dry-run", ["--set", "judge.timeout_s=.nan"], "judge.timeout_s"),
    ("judge --dry-run", ["--set", "judge.temperature=.inf"], "judge.temperature"),
    ("report", ["--set", "report.output=s3://bucket/report"], "report.output"),
    ("data prepare", ["--output", "gs://bucket/data"], "data.output"),
]


@pytest.mark.parametrize("command, flags, key", MUST_FAIL, ids=[f"{c}:{f[-1][:30]}" for c, f, _ in MUST_FAIL])
def test_issue_13_cases_are_one_error_naming_the_key(stub_stages, tmp_path, command, flags, key):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(dump(BASE).encode())
    code, stderr = run_case(verb_argv(command, str(spec)) + flags)
    assert code == 2 and key in stderr and not stub_stages, stderr


@pytest.mark.parametrize("content, fragment", [
    (b"name: \xff\xfe\n", "not UTF-8"), (b"a: " + b"[" * 10_000 + b"]" * 10_000, "nested more than"),
    (b"train:\n  seed: " + b"7" * 5000 + b"\n", "5000 digits"),
], ids=["not-utf8", "deep", "long-int"])
def test_unreadable_spec_files_name_the_file_and_line(stub_stages, tmp_path, content, fragment):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    for command in COMMANDS:
        code, stderr = run_case(verb_argv(command, str(spec)))
        assert code == 2 and str(spec) in stderr and "line " in stderr and fragment in stderr, stderr


def test_the_real_cli_prints_one_line_and_no_traceback(tmp_path):
    """A few cases through ``python -m raygpt.cli``, run side by side: exit 2, one error line."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff" * 100)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 10_000 + "]" * 10_000)
    valid = tmp_path / "spec.yaml"
    valid.write_text(dump(BASE))
    cases = [["train", "/dev/zero"], ["eval", str(binary)], ["report", str(deep)],
             ["train", str(valid), "--num-cpus", "-4"],
             ["judge", str(valid), "--dry-run", "--set", "judge.answers=[s3:///x.json]"]]
    running = [subprocess.Popen([sys.executable, "-m", "raygpt.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for argv in cases]
    for argv, process in zip(cases, running):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (argv, out, err)
        assert "Traceback" not in out + err, (argv, err)
        errors = [line for line in err.splitlines() if line.startswith(f"raygpt {argv[0]}: error: ")]
        assert len(errors) == 1, (argv, err)
