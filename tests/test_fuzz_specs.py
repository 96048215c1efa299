"""Fuzzed run specs and flags: every one is accepted or gives one clear error, before Ray starts.

A few hundred mutations (fixed seed) of a valid spec and of the flags of ``raygpt train``,
``eval``, ``data prepare``, ``judge --dry-run`` and ``report``: wrong types and unknown keys
at every level, negative, zero, huge and non-finite numbers, empty, binary and oversized
files, lists for mappings, deep nesting, alias bombs, repeated keys, YAML 1.1 forms
(``1:30``, ``yes``), text that is not UTF-8, malformed ``--set``, URIs of other schemes or
without a bucket. Each runs the CLI's ``main`` in this process with the stage itself
replaced by a stub, so what is exercised is what a command does before its stage (and Ray)
starts: argparse, the flag checks and ``load_spec``. A case passes when ``main`` returns 0
with a spec that passes validation, or 2 with one ``raygpt VERB: error:`` line naming the
problem; any other exception, or more than a few seconds, fails it. The cases of issues 13
and 18 are tests of their own; those past the spec (files read whole, flags of ``sample``, an
S3 endpoint that does not resolve, what only the dataset decides) run the real command.

Accepted on purpose (about 40 of the cases are, with this seed):

- Any string without a scheme is a local path: ``' '``, ``'\u202e'`` or a 5,000-character
  name is a folder name to ``load_spec``; the OS judges it on first use, and the storage seam
  turns its OSError into one RaygptError naming the path.
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
from pathlib import Path

import pytest
import yaml

import raygpt.data.prepare
import raygpt.evaluate
import raygpt.judge.run
import raygpt.report
import raygpt.train.launch
from raygpt.cli import main
from raygpt.config import RunSpec, parse_section, spec_to_dict

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "tests" / "specs" / "train-tiny.yaml").read_text())
BASE["storage_path"] = "runs"  # local: nothing is written (the stages are stubs), and no S3 is needed
BASE["train"]["dataset"] = "data/tiny"
SECTIONS = {name: field.annotation for name, field in RunSpec.model_fields.items()}
CASE_TIME_LIMIT_S = 5


class Raw(str):
    """A value written into the YAML text as it is (a 5000-digit number, a tag, deep nesting)."""


DEEP = "[" * 200 + "]" * 200
# "Billion laughs" in one flow value: 10**6 values once the aliases are expanded.
BOMB = ("[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]")
SURROGATE = "run\udcff"  # what Python makes of the byte 0xff in a command line
BAD_VALUES = [
    None, "", "x", True, -1, 0, -(2**31), 2**63, 2**70, 1.5, -0.0, 1e-300, float("nan"), float("inf"), float("-inf"),
    [], [1, 2], ["a", 3], {}, {"a": 1}, "s3:///x.json", "s3://ab/x", "S3://bucket/x", "s3:/bucket/x", "gs://b/x",
    "http://h/x", "ftp://h:21", "file:///tmp/x", "..", ".", "a/b", "a\nb", "a\x00b", " ", "\u202e", "x" * 5000,
    Raw("9" * 5000), Raw("-" + "9" * 4000), Raw(DEEP), Raw("2024-13-45"), Raw("!!binary AAAA"), Raw("&a [*a]"),
    Raw("1e400"), Raw(".NaN"), Raw("0x1F"), Raw("0o777"), Raw("1_000"), Raw("!!str 1"), Raw("~"),
    Raw(BOMB), Raw("1:30"), Raw("12:30:00"), Raw("yes"), Raw("off"), Raw("0777"), Raw("1e9"),
]
BAD_SETS = [
    "=1", "train", "train.lr", ".=1", "train..lr=1", "train.lr.x=1", "train.lr=[", "train.lr={", "name.x=1",
    "train.seed=" + "9" * 5000, "train.dataset=" + DEEP, "train.lr=!!binary AAAA", "train.lr=&a [*a]",
    "name=..", "name=.", "name=a/b", "storage_path=gs://b/x", "storage_path=S3://b/x", "storage_path=s3:/b/x",
    "train.lr=.nan", "train.lr=.inf", "train.beta1=5", "train.beta2=-1", "train.seed=1180591620717411303424",
    "train.grad_clip=.nan", "train.weight_decay=.inf", "judge.timeout_s=.nan", "judge.temperature=.inf",
    "storage.endpoint_url=ftp://h:21", "judge.answers=[s3:///x.json]", "=", "a=b=c", "train.num_workers=[1]",
    "train.num_workers=[3, 1]", "train=[1]", "train=5", "log.trackers=[tensorboard, tensorboard]",
    "train.num_workers=" + BOMB, "train.lr=1:30", "train.max_steps=12:30:00", "train.compile=yes", f"name={SURROGATE}",
    "model.vocab_multiple=0", "model.vocab_multiple=1e9", "model.context_length=1e9", "judge.passes=10000000",
    "data.shard_tokens=1", "judge.model=", "judge.base_url=", "train.use_gpu=on",
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
    return [f"{prefix}{name}" for name in section.model_fields]


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
        assert isinstance(spec, RunSpec)
        parse_section(RunSpec, spec_to_dict(spec), "the spec a stage got")  # raises unless valid
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


def run_case(argv: list[str], limit_s: float = CASE_TIME_LIMIT_S) -> tuple[int, str]:
    """``main(argv)`` under a time limit: (exit status, stderr); an unexpected exception fails."""
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: a flag of the wrong type
                code = e.code
    except TookTooLong:
        pytest.fail(f"{argv!r:.300}: still running after {limit_s} s")
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
    # Issue 18: tracebacks and hangs ...
    ("train", ["--set", "train.num_workers=" + BOMB], "train.num_workers"),
    ("eval", ["--set", "eval.models=" + BOMB], "eval.models"), ("train", ["--set", "name=" + BOMB], "name"),
    ("judge --dry-run", ["--set", "judge.passes=10000000"], "judge.passes"),
    ("judge --dry-run", ["--set", f"ift.seeds=[{', '.join(map(str, range(101)))}]"], "ift.seeds"),
    ("train", ["--set", f"name={SURROGATE}"], "name"),
    ("train", ["--set", f"storage_path={SURROGATE}"], "storage_path"),
    ("judge --dry-run", ["--answers", f"{SURROGATE}.json"], "--answers"),
    ("data prepare", ["--output", SURROGATE], "data.output"),
    ("train", ["--set", "model.vocab_multiple=0"], "model.vocab_multiple"),
    ("train", ["--set", "model.vocab_multiple=-64"], "model.vocab_multiple"),
    ("report", ["--output", "/dev/null"], "report.output"), ("report", ["--output", "{tmp}/a-file"], "report.output"),
    ("report", ["--output", "{tmp}/a-file/report"], "report.output"),
    # ... and values taken silently, or failing only after Ray started.
    ("train", ["--set", "train.lr=1:30"], "train.lr"), ("train", ["--set", "train.max_steps=12:30:00"], "max_steps"),
    ("data prepare", ["--set", "data.shard_tokens=1"], "data.shard_tokens"),
    ("judge --dry-run", ["--set", "judge.model="], "judge.model"),
    ("judge --dry-run", ["--set", "judge.base_url="], "judge.base_url"),
    ("data prepare", ["--source", ""], "data.source"), ("data prepare", ["--output", ""], "data.output"),
    ("data prepare", ["--chinchilla", ""], "data.chinchilla"),
    ("train", ["--set", "model.context_length=1e9"], "model.context_length"),
    ("train", ["--set", "model.vocab_multiple=1e9"], "model.vocab_multiple"),
    ("train", ["--set", "train.schedule=cosin"], "did you mean 'cosine'"),
]


@pytest.mark.parametrize("command, flags, key", MUST_FAIL, ids=[f"{c}:{f[-1][:30]}" for c, f, _ in MUST_FAIL])
def test_issue_13_and_18_cases_are_one_error_naming_the_key(stub_stages, tmp_path, command, flags, key):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(dump(BASE).encode())
    (tmp_path / "a-file").write_text("not a folder")
    code, stderr = run_case(verb_argv(command, str(spec)) + [f.replace("{tmp}", str(tmp_path)) for f in flags])
    assert code == 2 and key in stderr and not stub_stages, stderr
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


@pytest.mark.parametrize("content, fragment", [
    ("train:\n  lr: 1.0e-3\ntrain:\n  max_steps: 3\n", "line 3, column 1: 'train' is given twice (first at line 1)"),
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "line 3, column 3: 'lr' is given twice (first at line 2)"),
    ("l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + LAUGHS + "train:\n  num_workers: *l9\n", "more than 10,000 values"),
    ("train: &t\n  x: *t\n", "more than 10,000 values once its aliases are expanded, at train.x.x"),
    ("train:\n  lr: 1:30\n", "train.lr: expected a number, got '1:30' (str)"),
    ("train:\n  max_steps: 12:30:00\n", "train.max_steps: expected an integer, got '12:30:00' (str)"),
    ("train:\n  compile: yes\n", "train.compile: expected true or false, got 'yes' (str)"),
    ("model:\n  vocab_multiple: 0\n", "model.vocab_multiple: must be in 1..4096, got 0"),
], ids=["repeated-section", "repeated-key", "billion-laughs", "recursive-alias", "sexagesimal", "sexagesimal-time",
        "yaml-1.1-bool", "vocab-multiple"])
def test_issue_18_spec_files_are_one_error_naming_the_place(stub_stages, tmp_path, content, fragment):
    spec = tmp_path / "spec.yaml"
    spec.write_text(content)
    code, stderr = run_case(["train", str(spec)])
    assert code == 2 and str(spec) in stderr and fragment in stderr and not stub_stages, stderr


def test_yaml_1_2_forms_are_read_as_yaml_1_2(tmp_path):
    """What YAML 1.1 reads as numbers, dates or booleans stays text where text is meant."""
    from raygpt.config import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: no\nstorage_path: 2024-01-02\ntrain:\n  seed: 0777\n  max_steps: 10_000\n"
                    "  lr: 1e-3\nlog:\n  project: 1:30\n")
    loaded = load_spec(spec)
    assert (loaded.name, loaded.storage_path, loaded.log.project) == ("no", "2024-01-02", "1:30")
    assert (loaded.train.seed, loaded.train.max_steps, loaded.train.lr) == (777, 10_000, 1e-3)


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


# Issue 18 cases past the spec: each runs the real command (no stub) up to where it fails, and
# must fail there with one line, before any model, judge call or Ray.


def one_error(code: int, stderr: str, *fragments: str) -> None:
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert all(f in stderr for f in fragments), stderr


def test_small_files_are_read_up_to_a_limit(tmp_path):
    """A manifest, an answers file or a metrics file that is /dev/zero or huge: read no further than the limit."""
    from raygpt.data.manifest import load_manifest
    from raygpt.errors import RaygptError
    from raygpt.storage import Storage

    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(RaygptError, match=r"manifest.json: larger than 64 MiB"):
        load_manifest(str(dataset), Storage())
    spec = tmp_path / "judge.yaml"
    spec.write_text(f"storage_path: {tmp_path / 'runs'}\njudge:\n  cache_dir: {tmp_path / 'cache'}\n")
    one_error(*run_case(["judge", str(spec), "--dry-run", "--answers", "/dev/zero"], 30), "/dev/zero: larger than")


def test_answers_files_that_are_not_utf8_or_too_long_are_one_error(tmp_path):
    import json

    spec = tmp_path / "judge.yaml"
    spec.write_text(f"storage_path: {tmp_path / 'runs'}\njudge:\n  cache_dir: {tmp_path / 'cache'}\n")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"model": "m\xff", "items": []}')
    one_error(*run_case(["judge", str(spec), "--dry-run", "--answers", str(binary)], 30),
              f"{binary}: line 1: not UTF-8 text (byte 0xff")
    long = tmp_path / "long.json"
    item = {"instruction": "i", "input": "", "output": "o", "response": "r"}
    long.write_text(json.dumps({"model": "m", "items": [item] * 10_001}))
    one_error(*run_case(["judge", str(spec), "--dry-run", "--answers", str(long)], 30), "10,001 items, more than")


def test_an_s3_endpoint_that_does_not_resolve_fails_at_once_naming_it(tmp_path, monkeypatch):
    """Name resolution fails the same way every time: not an outage to retry for storage.retry_minutes."""
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # so that pyarrow asks no instance profile
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    spec = tmp_path / "judge.yaml"
    spec.write_text(f"storage_path: {tmp_path / 'runs'}\nstorage:\n  endpoint_url: http://no-such-host.invalid:8333\n"
                    f"  retry_minutes: 10\njudge:\n  cache_dir: {tmp_path / 'cache'}\n")
    started = time.monotonic()
    code, stderr = run_case(["judge", str(spec), "--dry-run", "--answers", "s3://bucket/answers.json"], 60)
    one_error(code, stderr, "no-such-host.invalid does not resolve", "storage.endpoint_url")
    assert time.monotonic() - started < 60


def test_metrics_lines_that_are_not_utf8(tmp_path):
    """The report counts such a line as unreadable and goes on; resuming training names it."""
    from raygpt.errors import RaygptError
    from raygpt.storage import Storage
    from raygpt.train.metrics import read_metrics

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 5.0}\n{"step": 2, "loss": "\xff"}\n')
    spec = tmp_path / "report.yaml"
    spec.write_text(f"storage_path: {tmp_path / 'runs'}\nreport:\n  output: {tmp_path / 'report'}\n")
    code, stderr = run_case(["report", str(spec)], 60)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "1 unreadable line(s)" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(RaygptError, match="metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(str(run), Storage())


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "nan"], "--temperature: must be a finite number"),
    (["--temperature", "inf"], "--temperature: must be a finite number"),
    (["--seed", str(2**70)], "--seed: must be in 0..4294967295"), (["--seed", "-1"], "--seed: must be in"),
    (["--device", "foo"], "--device 'foo': expected cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta': expected"), (["--device", ""], "--device '': expected"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),
], ids=["nan", "inf", "seed-2**70", "seed-negative", "foo", "meta", "empty", "absent-gpu"])
@pytest.mark.parametrize("verb", ["sample", "chat"])
def test_sample_and_chat_flags_are_checked_before_a_model_loads(tmp_path, verb, flags, fragment):
    # A model reference that does not exist: were the flags not checked first, the error would name it.
    code, stderr = run_case([verb, str(tmp_path / "no-model"), *flags], 30)
    one_error(code, stderr, fragment)


def test_export_to_an_empty_folder_name_is_refused(tmp_path):
    one_error(*run_case(["export", str(tmp_path / "no-model"), ""], 30), "OUTPUT '': empty")


def test_jsonl_text_that_is_not_a_string_is_refused(tmp_path):
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"text": "a document"}\n{"text": 42}\n')
    code, stderr = run_case(["data", "prepare", "--source", str(corpus), "--output", str(tmp_path / "data"),
                             "--num-proc", "1"], 60)
    one_error(code, stderr, f"{corpus}:2: 'text' is int, not text")
    assert not (tmp_path / "data" / "manifest.json").exists()


@pytest.mark.integration
def test_what_only_the_dataset_decides_fails_before_ray(s3_env, tiny_dataset, tmp_path, monkeypatch):
    """A global batch larger than the train split with an explicit max_steps, and eval.max_tokens
    shorter than one window, fail before Ray starts, naming the key at fault."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"storage_path: {tmp_path / 'runs'}\nmodel:\n  preset: tiny\ntrain:\n  dataset: {tiny_dataset}\n"
                    f"eval:\n  dataset: {tiny_dataset}\n")
    code, stderr = run_case(["train", str(spec), "--set", "train.global_batch_tokens=131072", "--set",
                             "train.max_steps=5", "--set", "train.micro_batch_size=16"], 120)
    one_error(code, stderr, "train.global_batch_tokens: a step reads 2,048 sequences of 65 tokens, but the train "
                            "split of")
    code, stderr = run_case(["eval", str(spec), "--model", "openai:gpt2", "--set", "eval.max_tokens=512"], 120)
    one_error(code, stderr, "eval.max_tokens: 512 test tokens are fewer than one window of 1025")
