"""The handler of every stage verb: read the spec and flags, call the stage, print its result.

Handlers hold no stage logic: what a stage does lives in its own module, so the same work
runs from the CLI, a Ray job or a test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.stages import RUN_RECORD_FILE, run_dir
from raygpt.storage import Storage, join


def make_console(log_width: int = 200, **options) -> Console:
    """A rich console: the terminal's width on a terminal; in a log or a pipe, whole rows of
    ``log_width`` columns instead of rows cut to 80."""
    console = Console(**options)
    return console if console.is_terminal else Console(width=log_width, **options)


MAX_LOCAL_CPUS = 1 << 16
"""Logical CPUs a local instance may claim: more is a typo, and Ray keeps resource amounts
in fixed point, where 10**15 overflows."""


def check_ray_flags(args) -> None:
    """``--address`` and ``--num-cpus`` checked before the spec is read and before any Ray
    starts; whether the address answers is checked when the stage connects."""
    from raygpt.cluster import address_problem

    problems = []
    if args.address is not None and (problem := address_problem(args.address)):
        problems.append(f"--address {problem}")
    if args.num_cpus is not None and not 0 < args.num_cpus <= MAX_LOCAL_CPUS:
        problems.append(f"--num-cpus: must be in 1..{MAX_LOCAL_CPUS}, got {args.num_cpus}")
    if problems:
        raise RaygptError("; ".join(problems))


def check_flag_uris(*flags: tuple[str, list[str] | str | None, bool]) -> None:
    """(flag, value or values, whether s3:// is allowed): the URIs that flags put beside the
    spec's, which ``load_spec`` never sees, checked as it checks those."""
    from raygpt.storage import uri_problem

    problems = []
    for flag, values, remote in flags:
        for value in [values] if isinstance(values, str) else values or []:
            if problem := uri_problem(value, remote=remote):
                problems.append(f"{flag} {problem}")
    if problems:
        raise RaygptError("; ".join(problems))


def flag_settings(*flags: tuple[str, Any]) -> dict[str, Any]:
    """(spec key, flag value) of the flags given (not None), for ``load_spec(settings=...)``."""
    return {key: value for key, value in flags if value is not None}


def prepare_command(args) -> int:
    """``raygpt data prepare [SPEC] [--source S] [--output URI] [--tokens N | --chinchilla PRESET]``."""
    # The flags are settings of the spec, so load_spec checks them (an empty --source is no
    # source, not "unset") and names the spec file and the key.
    settings = flag_settings(("data.source", args.source), ("data.output", args.output),
                             ("data.num_proc", args.num_proc))
    if args.tokens is not None:
        settings.update({"data.tokens": args.tokens, "data.chinchilla": None})
    if args.chinchilla is not None:
        settings.update({"data.tokens": None, "data.chinchilla": args.chinchilla})
    spec = load_spec(args.spec, args.overrides, settings=settings)
    from raygpt.data.prepare import prepare  # torch: seconds to import, after the checks

    prepare(spec, Storage.from_config(spec.storage), console=Console())
    return 0


def train_command(args) -> int:
    """``raygpt train SPEC [--set k=v] [--address A] [--num-cpus N]``."""
    spec = load_spec(args.spec, args.overrides)
    check_ray_flags(args)
    from raygpt.train.launch import train  # torch and Ray: seconds to import, after the checks

    summary = train(spec, address=args.address, num_cpus=args.num_cpus)
    final = summary.get("final") or {}
    if final:
        val = f", val loss {final['val_loss']:.4f}" if final.get("val_loss") is not None else ""
        print(f"raygpt train: {spec.name} {summary.get('status')} at step {final.get('step')}: "
              f"loss {final.get('loss', float('nan')):.4f}{val}; run record {join(run_dir(spec), RUN_RECORD_FILE)}")
    return 0


def sweep_command(args) -> int:
    """``raygpt sweep SPEC [--set k=v] [--combine A,B] [--output DIR]``: train every (variant,
    seed), evaluate, fine-tune and judge them as the spec's stages say, and report."""
    from raygpt.sweep.spec import load_sweep, parse_combine

    check_flag_uris(("--output", args.output, False))
    sweep = load_sweep(args.spec, args.overrides, parse_combine(args.combine))  # every run checked before Ray
    check_ray_flags(args)
    from raygpt.sweep.run import run_sweep  # torch, Ray and Tune: seconds to import, after the checks

    document = run_sweep(sweep, make_console(), address=args.address, num_cpus=args.num_cpus,
                         local_report=args.output)
    failed = [r["run"] for r in document["runs"] if r["status"] == "failed" or r["error"]]
    problems = ([f"{len(failed)} of {len(document['runs'])} run(s) failed: {', '.join(failed)}"] if failed else []) + \
        [f"the {stage} stage failed" for stage in document["stage_errors"]]
    if problems:
        print(f"raygpt sweep: {'; '.join(problems)} (their errors are in the report); the same command "
              "resumes the sweep", file=sys.stderr)
        return 1
    return 0


def eval_command(args) -> int:
    """``raygpt eval SPEC [--model REF]... [--task test_loss|hellaswag]...``."""
    flags = list(args.overrides) + ([f"eval.tasks=[{','.join(args.tasks)}]"] if args.tasks else [])
    spec = load_spec(args.spec, flags)
    check_ray_flags(args)
    check_flag_uris(("--model", args.models, True))
    from raygpt.evaluate import EVAL_TASKS  # torch and Ray: seconds to import, after the checks

    models = list(args.models) if args.models else list(spec.eval.models)
    for task in spec.eval.tasks:
        evaluate, show = EVAL_TASKS[task]
        document = evaluate(spec, models, address=args.address, num_cpus=args.num_cpus)
        show(document, make_console())
        print(f"results: {document['uri']}")
    return 0


def ift_command(args) -> int:
    """``raygpt ift SPEC [--model REF]... [--data SOURCE] [--output URI] [--force]``."""
    spec = load_spec(args.spec, args.overrides, settings=flag_settings(
        ("ift.models", args.models), ("ift.data", args.data), ("ift.output", args.output)))
    check_ray_flags(args)
    from raygpt.ift import print_summary, run_ift  # torch and Ray: seconds to import, after the checks

    summaries, output = run_ift(spec, address=args.address, num_cpus=args.num_cpus, force=args.force)
    print_summary(summaries, output, make_console(log_width=120))
    return 0


def judge_command(args) -> int:
    """``raygpt judge SPEC [--answers URI]... [--dry-run | --export-alpaca-eval DIR]``."""
    check_flag_uris(("--answers", args.answers, True), ("--export-alpaca-eval", args.export_alpaca_eval, True))
    spec = load_spec(args.spec, args.overrides)
    if args.answers:
        spec.judge.answers = list(args.answers)
    storage = Storage.from_config(spec.storage)
    if args.export_alpaca_eval:
        from raygpt.judge.export import export_alpaca_eval

        written = export_alpaca_eval(spec, storage, args.export_alpaca_eval)
        print(f"wrote {len(written) - 1} model_outputs.json and reference_outputs.json under {args.export_alpaca_eval}; "
              f"score them with: alpaca_eval --model_outputs {written[0]} --reference_outputs {written[-1]}")
        return 0
    from raygpt.judge.run import run_judge

    run_judge(spec, storage, make_console(), dry_run=args.dry_run)
    return 0


def report_command(args) -> int:
    """``raygpt report [SPEC] [--output DIR]``; of a sweep spec, the sweep's comparison."""
    from raygpt.report import build_report, check_report_output, render_terminal, write_report

    check_flag_uris(("--output", args.output, False))
    if args.spec is not None:
        from raygpt.sweep.spec import is_sweep_file, load_sweep

        if is_sweep_file(args.spec):
            from raygpt.sweep.report import REPORT_FOLDER, gather, render, sweep_folders, write

            sweep = load_sweep(args.spec, args.overrides)
            if args.output is not None:
                check_report_output(args.output)
            storage = Storage.from_config(sweep.stage_spec.storage)
            document = gather(sweep, storage)
            console = make_console()
            render(document, console)
            written = write(document, storage, sweep_folders(sweep)[REPORT_FOLDER], args.output)
            console.print("wrote " + ", ".join(written), soft_wrap=True, highlight=False)
            return 0
    spec = load_spec(args.spec, args.overrides)
    if args.output is not None:
        spec.report.output = args.output
    check_report_output(spec.report.output)
    report = build_report(spec, Storage.from_config(spec.storage))
    console = make_console()
    render_terminal(report, console)
    written = write_report(report, spec.report.output)
    console.print("wrote " + ", ".join(str(p) for p in written), soft_wrap=True)
    return 0


def export_command(args) -> int:
    """``raygpt export MODEL OUT [--dtype bf16] [--push-to-hub REPO [--private]]``: a model (run
    name, checkpoint URI, ift:NAME, openai:NAME) as a Hugging Face GPT-2 folder with a model card."""
    from raygpt.storage import is_remote
    from raygpt.weights.hf import EXPORT_DTYPES, export_hf
    from raygpt.weights.hub import connect_hub, model_card, model_facts, push_folder
    from raygpt.weights.refs import load_model

    check_flag_uris(("OUTPUT", args.output, True))  # an empty OUTPUT would be the current folder
    spec = load_spec(args.spec, args.overrides)
    storage = Storage.from_config(spec.storage)
    hub = None
    if args.push_to_hub:
        if is_remote(args.output):
            raise RaygptError(f"--push-to-hub uploads a local folder: export to a local OUT, not {args.output}")
        hub = connect_hub(args.push_to_hub)  # seconds, before any work: the Hub answers and takes the token
    model, info = load_model(args.model, spec, storage, "cpu")
    provenance = {"source": args.model}
    provenance.update({key: str(info[key]) for key in ("step", "tokens") if info.get(key) is not None})
    card = model_card(model_facts(args.model, info, spec, storage), repo_id=args.push_to_hub)
    written = export_hf(model, args.output, storage=storage, provenance=provenance, dtype=EXPORT_DTYPES[args.dtype],
                        card=card)
    c = model.config
    head = "tied head" if c.tie_weights else "untied head"
    print(f"exported {info.get('id', args.model)} ({model.num_params():,} params, {c.n_layer} layers, {head}, "
          f"{args.dtype}) to {args.output}: {', '.join(Path(w).name for w in written)}")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(args.output)!r})")
    if hub is not None:
        print(f"pushed to {push_folder(hub, str(args.output), args.push_to_hub, private=args.private)}")
    return 0


def check_sampling_flags(args) -> None:
    """``--max-new-tokens``, ``--temperature``, ``--top-k``, ``--seed`` (and ``--num-samples``)
    of ``sample`` and ``chat``, all problems in one RaygptError before any model loads."""
    from raygpt.config import SEED_LIMIT

    problems = [f"{flag}: must be positive, got {value}" for flag, value in
                (("--max-new-tokens", args.max_new_tokens), ("--num-samples", getattr(args, "num_samples", 1)))
                if value <= 0]
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature: must be a finite number, 0 or more, got {args.temperature}")
    if args.top_k < 0:
        problems.append(f"--top-k: must not be negative, got {args.top_k}")
    if not 0 <= args.seed < SEED_LIMIT:
        problems.append(f"--seed: must be in 0..{SEED_LIMIT - 1}, got {args.seed}")
    if problems:
        raise RaygptError("; ".join(problems))


def _device(requested: str | None) -> str:
    """The device ``--device`` names (default: cuda when present), checked: a device torch does
    not know, one that holds no data (meta) or a GPU this machine does not have is an error."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RaygptError(f"--device {requested!r}: expected cpu, cuda or cuda:N")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise RaygptError(f"--device {requested}: this machine has {gpus} CUDA GPU(s)"
                          + ("" if torch.version.cuda else " (this torch is built without CUDA)"))
    return requested


def _autocast(device: str):
    """bf16 autocast on GPUs that have it, else nothing: sampling needs no fp32 accuracy."""
    import contextlib

    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def sample_command(args) -> int:
    """``raygpt sample MODEL [SPEC] --prompt TEXT [--max-new-tokens N --temperature T --top-k K
    --seed S --num-samples N]``: text from any model, streamed to the terminal as it is generated."""
    import sys

    import torch

    from raygpt.sample import sample_text
    from raygpt.weights.refs import load_model

    check_sampling_flags(args)
    spec = load_spec(args.spec, args.overrides)
    device = _device(args.device)
    model, info = load_model(args.model, spec, Storage.from_config(spec.storage), device)
    print(f"{info['id']}: {model.num_params():,} params on {device}; temperature {args.temperature:g}, "
          f"top-k {args.top_k or 'all'}, seed {args.seed}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    for i in range(args.num_samples):
        if i:
            write("\n---------------\n")
        write(args.prompt)
        sample_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, generator,
                    on_text=write, autocast=_autocast(device))
    write("\n")
    return 0


def chat_command(args) -> int:
    """``raygpt chat MODEL [SPEC]``: instructions from stdin, answers streamed back, in the
    prompt format the model was fine-tuned with; an empty input (Ctrl-D), /exit or /quit ends."""
    import sys

    import torch

    from raygpt.prompts import get_prompt_style
    from raygpt.sample import chat
    from raygpt.weights.refs import load_model, prompt_style_of

    check_sampling_flags(args)
    spec = load_spec(args.spec, args.overrides)
    storage = Storage.from_config(spec.storage)
    device = _device(args.device)
    style = get_prompt_style(args.prompt_style or prompt_style_of(args.model, spec, storage) or spec.ift.prompt_style)
    model, info = load_model(args.model, spec, storage, device)
    interactive = sys.stdin.isatty()
    print(f"{info['id']}: {model.num_params():,} params on {device}, {style.name} prompt; "
          "one instruction per line, /exit or Ctrl-D ends", file=sys.stderr)

    def read() -> str | None:
        if interactive:
            try:
                return input(">>> ")
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line if line else None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generator = torch.Generator(device=device).manual_seed(args.seed)
    chat(model, style, read, write, args.max_new_tokens, args.temperature, args.top_k or None, generator,
         autocast=_autocast(device))
    return 0
