"""The handler of every stage verb: read the spec and flags, call the stage, print its result.

Handlers hold no stage logic: what a stage does lives in its own module, so the same work
runs from the CLI, a Ray job or a test.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from raygpt.config import load_spec
from raygpt.stages import RUN_RECORD_FILE, run_dir
from raygpt.storage import Storage, join


def make_console(log_width: int = 200, **options) -> Console:
    """A rich console: the terminal's width on a terminal; in a log or a pipe, whole rows of
    ``log_width`` columns instead of rows cut to 80."""
    console = Console(**options)
    return console if console.is_terminal else Console(width=log_width, **options)


def prepare_command(args) -> int:
    """``raygpt data prepare [SPEC] [--source S] [--output URI] [--tokens N | --chinchilla PRESET]``."""
    from raygpt.data.prepare import prepare

    # The flags are overrides like any --set, so load_spec checks them and names the spec file.
    flags = list(args.overrides)
    if args.source:
        flags.append(f"data.source={args.source}")
    if args.output:
        flags.append(f"data.output={args.output}")
    if args.tokens is not None:
        flags += [f"data.tokens={args.tokens}", "data.chinchilla=null"]
    if args.chinchilla:
        flags += ["data.tokens=null", f"data.chinchilla={args.chinchilla}"]
    if args.num_proc is not None:
        flags.append(f"data.num_proc={args.num_proc}")
    spec = load_spec(args.spec, flags)
    prepare(spec, Storage.from_config(spec.storage), console=Console())
    return 0


def train_command(args) -> int:
    """``raygpt train SPEC [--set k=v] [--address A] [--num-cpus N]``."""
    from raygpt.train.launch import train

    spec = load_spec(args.spec, args.overrides)
    summary = train(spec, address=args.address, num_cpus=args.num_cpus)
    final = summary.get("final") or {}
    if final:
        val = f", val loss {final['val_loss']:.4f}" if final.get("val_loss") is not None else ""
        print(f"raygpt train: {spec.name} {summary.get('status')} at step {final.get('step')}: "
              f"loss {final.get('loss', float('nan')):.4f}{val}; run record {join(run_dir(spec), RUN_RECORD_FILE)}")
    return 0


def eval_command(args) -> int:
    """``raygpt eval SPEC [--model REF]...``."""
    from raygpt.evaluate import evaluate, show_results

    spec = load_spec(args.spec, args.overrides)
    models = list(args.models) if args.models else list(spec.eval.models)
    document = evaluate(spec, models, address=args.address, num_cpus=args.num_cpus)
    show_results(document, make_console())
    print(f"results: {document['uri']}")
    return 0


def ift_command(args) -> int:
    """``raygpt ift SPEC [--model REF]... [--data SOURCE] [--output URI] [--force]``."""
    from raygpt.ift import print_summary, run_ift

    spec = load_spec(args.spec, args.overrides)
    if args.models:
        spec.ift.models = list(args.models)
    if args.data:
        spec.ift.data = args.data
    if args.output:
        spec.ift.output = args.output
    summaries, output = run_ift(spec, address=args.address, num_cpus=args.num_cpus, force=args.force)
    print_summary(summaries, output, make_console(log_width=120))
    return 0


def judge_command(args) -> int:
    """``raygpt judge SPEC [--answers URI]... [--dry-run | --export-alpaca-eval DIR]``."""
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
    """``raygpt report [SPEC] [--output DIR]``."""
    from raygpt.report import build_report, render_terminal, write_report

    spec = load_spec(args.spec, args.overrides)
    if args.output:
        spec.report.output = args.output
    report = build_report(spec, Storage.from_config(spec.storage))
    console = make_console()
    render_terminal(report, console)
    written = write_report(report, spec.report.output)
    console.print("wrote " + ", ".join(str(p) for p in written), soft_wrap=True)
    return 0


def export_command(args) -> int:
    """``raygpt export MODEL OUTDIR``: a checkpoint (run name, checkpoint URI, openai:NAME) as
    a Hugging Face GPT-2 folder."""
    from raygpt.weights.hf import export_hf
    from raygpt.weights.refs import load_model

    spec = load_spec(args.spec, args.overrides)
    storage = Storage.from_config(spec.storage)
    model, info = load_model(args.model, spec, storage, "cpu")
    provenance = {"source": args.model}
    provenance.update({key: str(info[key]) for key in ("step", "tokens") if info.get(key) is not None})
    written = export_hf(model, args.output, storage=storage, provenance=provenance)
    c = model.config
    head = "tied head" if c.tie_weights else "untied head"
    print(f"exported {info.get('id', args.model)} ({model.num_params():,} params, {c.n_layer} layers, {head}) "
          f"to {args.output}: {', '.join(Path(w).name for w in written)}")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(args.output)!r})")
    return 0
