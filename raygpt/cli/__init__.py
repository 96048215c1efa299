"""``raygpt``: one command, a verb per stage.

Each verb's handler lives in this package (``commands``, ``jobs``, ``doctor``, ``quickstart``)
and is imported only when that verb runs, so ``raygpt --help`` stays fast; the handlers call
the stages and hold no stage logic. A ``RaygptError`` anywhere becomes one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from raygpt import __version__
from raygpt.errors import RaygptError
from raygpt.logs import show_messages


def _spec_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("spec", help="run spec (YAML), e.g. jobs/train-gpt2-small-fineweb.yaml")
    else:
        p.add_argument("spec", nargs="?", default=None, help="run spec (YAML); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.lr=3e-4 (repeatable)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raygpt", description="Train GPT-2-class models from scratch on Ray, and judge them.")
    parser.add_argument("--version", action="version", version=f"raygpt {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    data = verbs.add_parser("data", help="prepare token shards").add_subparsers(dest="data_verb", required=True)
    p = data.add_parser("prepare", help="text -> GPT-2 tokens -> shards + manifest (local or s3://)")
    _spec_args(p, required=False)
    p.add_argument("--source", help="fineweb, fineweb-edu, stdlib, or a local path/glob (data.source)")
    p.add_argument("--output", help="local directory or s3://bucket/prefix (data.output)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, help="training-token budget (data.tokens)")
    budget.add_argument("--chinchilla", metavar="PRESET", help="20 tokens per parameter of PRESET (data.chinchilla)")
    p.add_argument("--num-proc", type=int, help="tokenizer threads, 0: one per CPU (data.num_proc)")
    p.set_defaults(handler="raygpt.cli.commands:prepare_command")

    p = verbs.add_parser("train", help="pretrain with Ray Train (resumes a run of the same name)")
    _spec_args(p)
    _ray_args(p)
    p.set_defaults(handler="raygpt.cli.commands:train_command")

    p = verbs.add_parser("sweep", help="an ablation sweep: variants x seeds through Ray Tune, compared with the "
                                       "baseline seed by seed (resumes where it stopped)")
    p.add_argument("spec", help="sweep spec (YAML), e.g. jobs/sweep-gpt2-small-ablations.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-spec value of every run, e.g. --set train.max_steps=2000 (repeatable)")
    p.add_argument("--combine", action="append", default=[], metavar="A,B,...",
                   help="add a variant that stacks these variants' settings (repeatable; conflicting keys refused)")
    p.add_argument("--output", default=None, help="also write the report files into this local directory")
    _ray_args(p)
    p.set_defaults(handler="raygpt.cli.commands:sweep_command")

    p = verbs.add_parser("eval", help="test loss (and HellaSwag) of checkpoints and openai:NAME models")
    _spec_args(p, required=False)
    _ray_args(p)
    p.add_argument("--model", dest="models", action="append", default=None,
                   help="model to evaluate (run name, checkpoint URI, openai:gpt2); repeatable; replaces eval.models")
    p.add_argument("--task", dest="tasks", action="append", default=None, choices=["test_loss", "hellaswag"],
                   help="what to measure; repeatable; replaces eval.tasks (default: test_loss)")
    p.set_defaults(handler="raygpt.cli.commands:eval_command")

    p = verbs.add_parser("ift", help="instruction fine-tuning and answer generation")
    _spec_args(p, required=False)
    _ray_args(p)
    p.add_argument("--model", dest="models", action="append", default=None,
                   help="base model to fine-tune (run name, checkpoint URI, openai:gpt2); repeatable; replaces ift.models")
    p.add_argument("--data", default=None, help="instruction data: URL, local path or s3:// URI (ift.data)")
    p.add_argument("--output", default=None, help="where answers, metrics and models go (ift.output)")
    p.add_argument("--force", action="store_true", help="redo models whose answers are already there")
    p.set_defaults(handler="raygpt.cli.commands:ift_command")

    p = verbs.add_parser("judge", help="score fine-tuned answers with an LLM judge")
    _spec_args(p)
    p.add_argument("--answers", action="append", default=None, metavar="URI",
                   help="answers file from `raygpt ift`; repeatable; replaces judge.answers")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs and count the calls (and cached ones) without calling the judge")
    p.add_argument("--export-alpaca-eval", metavar="DIR", default=None,
                   help="write the answers in AlpacaEval's format (DIR/<model>/model_outputs.json, "
                        "DIR/reference_outputs.json) instead of judging")
    p.set_defaults(handler="raygpt.cli.commands:judge_command")

    p = verbs.add_parser("report", help="compare runs: terminal table, Markdown/JSON/CSV, plots")
    _spec_args(p, required=False)
    p.add_argument("--output", default=None, help="local directory for the report files (report.output)")
    p.set_defaults(handler="raygpt.cli.commands:report_command")

    p = verbs.add_parser("export", help="a checkpoint as a Hugging Face GPT-2 folder with a model card; --push-to-hub")
    p.add_argument("model", help="run name, checkpoint URI, ift:NAME or openai:NAME")
    p.add_argument("output", help="folder (or s3:// prefix) for config.json, model.safetensors and README.md")
    _spec_args(p, required=False)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the exported weights (default fp32; bf16 halves the size)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the folder to this Hugging Face Hub repo (user/name), created if missing; "
                        "endpoint $HF_ENDPOINT, token $HF_TOKEN or `hf auth login`")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(handler="raygpt.cli.commands:export_command")

    p = verbs.add_parser("sample", help="generate text from a model, streamed to the terminal")
    p.add_argument("model", help="run name, checkpoint or model folder, ift:NAME or openai:NAME")
    _spec_args(p, required=False)
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens; 0: all (default 200)")
    p.add_argument("--seed", type=int, default=1337, help="random seed of the sampling (default 1337)")
    p.add_argument("--num-samples", type=int, default=1, help="samples, one after another (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.set_defaults(handler="raygpt.cli.commands:sample_command")

    p = verbs.add_parser("chat", help="talk to an instruction-tuned model in the prompt format it was tuned with")
    p.add_argument("model", help="ift:NAME, a fine-tuned model folder, or any model reference")
    _spec_args(p, required=False)
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256, as raygpt ift)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as raygpt ift answers (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature: the k most likely tokens; 0: all")
    p.add_argument("--seed", type=int, default=1337, help="random seed of the sampling (default 1337)")
    p.add_argument("--prompt-style", default=None,
                   help="prompt format (default: the one the model was fine-tuned with, else ift.prompt_style)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.set_defaults(handler="raygpt.cli.commands:chat_command")

    p = verbs.add_parser("quickstart", help="the whole path on one machine, in minutes")
    p.add_argument("--workdir", default=".raygpt/quickstart", help="where data, store and report go")
    p.add_argument("--source", default=None, help="corpus: a local path, fineweb, or stdlib (default: try fineweb, else stdlib)")
    p.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting SeaweedFS")
    p.add_argument("--bucket", default="raygpt-quickstart", help="bucket for data and checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the embedded spec (raygpt/presets/quickstart.yaml), "
                        "e.g. --set train.max_steps=200")
    p.set_defaults(handler="raygpt.cli.quickstart:quickstart_command")

    p = verbs.add_parser("submit", help="submit a run spec as a Ray job and follow its logs")
    _spec_args(p)
    p.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    # dest "stage": "verb" is the subcommand's own dest, which the CLI's error messages name.
    p.add_argument("--verb", dest="stage", default=None,
                   choices=["train", "eval", "ift", "judge", "report", "data", "sweep"],
                   help="stage to run (default: sweep for a sweep spec, else from the spec's file name, else train)")
    p.add_argument("--no-follow", action="store_true", help="return after submitting")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="upload this folder with the job (it must hold the spec); default: the spec alone")
    p.set_defaults(handler="raygpt.cli.jobs:submit_command")

    p = verbs.add_parser("jobs", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop", "list"])
    p.add_argument("job_id", nargs="?",
                   help="submission id (raygpt-<verb>-<run name>[-N]), or a spec file for its latest submission")
    p.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends (Ctrl-C detaches)")
    p.set_defaults(handler="raygpt.cli.jobs:jobs_command")

    p = verbs.add_parser("doctor", help="check versions, GPUs/NCCL, tokenizer and storage")
    p.add_argument("--storage", default=None, help="URI whose reachability to check (e.g. s3://bucket/prefix)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to check: dashboard URL or GCS address (default: $RAY_ADDRESS; none: skipped)")
    p.add_argument("--require-gpu", action="store_true", help="no GPU (or no NCCL) is a failure, not a warning")
    p.set_defaults(handler="raygpt.cli.doctor:doctor_command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_messages()
    module_name, func_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        status = handler(args)
    except RaygptError as e:
        from raygpt.storage import without_userinfo  # on errors only: it loads pyarrow

        print(f"raygpt {args.verb}: error: {without_userinfo(str(e))}", file=sys.stderr)  # a URL may carry a password
        return 2
    except KeyboardInterrupt:
        print(f"raygpt {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
