"""Publishing a model: its model card, written from what raygpt recorded, and the Hub upload.

``model_facts`` gathers what is known about an exported model: its run's ``run.json`` (data,
tokens, steps, hardware, wall-clock, cost, the spec that reproduces it), the dataset's
manifest, and the stages' results that name it (test loss, HellaSwag, the judge's IFT score).
``model_card`` renders them as the ``README.md`` the Hub shows. ``connect_hub`` checks, in one
quick request before anything is exported, that the Hub answers and accepts the token (a Hub
that cannot be reached is one message in seconds); ``push_folder`` then uploads the export
folder through ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any

import yaml

from raygpt import __version__
from raygpt.errors import RaygptError
from raygpt.stages import HELLASWAG_FILE, JUDGE_SUMMARY_FILE, RUN_RECORD_FILE, TEST_LOSS_FILE, eval_dir, judge_dir
from raygpt.storage import Storage, join, without_credentials
from raygpt.weights.layout import CHECKPOINT_PREFIX
from raygpt.weights.refs import IFT_METRICS_FILE, IFT_PREFIX, OPENAI_PREFIX, fine_tuned_folder

DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 10.0
"""Seconds the reachability check waits for the Hub to connect and answer."""

HUB_DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
"""``data.source`` names and the Hub datasets they are."""


def model_facts(ref: str, info: dict[str, Any], spec: Any, storage: Storage) -> dict[str, Any]:
    """What raygpt knows about the model ``ref`` (``info`` as ``load_model`` describes it):
    ``run`` (its run.json), ``manifest``, ``fine_tuning`` (ift metrics of a fine-tuned model),
    ``test_loss``, ``hellaswag`` and ``ift_score``; absent pieces are None."""
    facts: dict[str, Any] = {"ref": ref, "info": info, "run": None, "manifest": None, "fine_tuning": None,
                             "test_loss": None, "hellaswag": None, "ift_score": None}
    folder = info.get("checkpoint")
    run_ref = ref
    if ref.startswith(IFT_PREFIX) or (folder and folder.rstrip("/").endswith("/model")):
        metrics_uri = join((fine_tuned_folder(ref, spec) if ref.startswith(IFT_PREFIX) else folder)[:-len("/model")],
                           IFT_METRICS_FILE)
        facts["fine_tuning"] = storage.read_json_or_none(metrics_uri)
        run_ref = (facts["fine_tuning"] or {}).get("base_model") or ref
    if not run_ref.startswith(OPENAI_PREFIX):
        facts["run"] = storage.read_json_or_none(join(_run_folder(run_ref, folder, spec), RUN_RECORD_FILE))
    if facts["run"]:
        dataset = (facts["run"].get("dataset") or {}).get("uri")
        facts["manifest"] = storage.read_json_or_none(join(dataset, "manifest.json")) if dataset else None
    ids = {ref, info.get("id"), folder} - {None}
    facts["test_loss"] = _result_for(storage.read_json_or_none(join(eval_dir(spec), TEST_LOSS_FILE)), ids, folder)
    facts["hellaswag"] = _result_for(storage.read_json_or_none(join(eval_dir(spec), HELLASWAG_FILE)), ids, folder)
    summary = storage.read_json_or_none(join(judge_dir(spec), JUDGE_SUMMARY_FILE)) or {}
    judged = [m for m in summary.get("models") or [] if m.get("model") in ids or m.get("base_model") in ids]
    if judged and judged[0].get("mean") is not None:
        facts["ift_score"] = {"mean": judged[0]["mean"], "ci95": judged[0].get("ci95"),
                              "judge": (summary.get("judge") or {}).get("model")}
    return facts


def _run_folder(ref: str, folder: str | None, spec: Any) -> str:
    """The run a model came from: the parent of its checkpoint folder, else the run named ``ref``."""
    if folder and folder.rstrip("/").rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX):
        return folder.rstrip("/").rsplit("/", 1)[0]
    return ref if "/" in ref else join(spec.storage_path, ref)


def _result_for(document: dict[str, Any] | None, ids: set[str], folder: str | None) -> dict[str, Any] | None:
    """This model's entry in an eval document: the one of its exact checkpoint, else one by name."""
    results = (document or {}).get("results") or []
    exact = [r for r in results if folder and r.get("checkpoint") == folder]
    named = [r for r in results if r.get("ref") in ids or r.get("model") in ids]
    found = (exact or named or [None])[0]
    return {**found, "document": {k: v for k, v in document.items() if k != "results"}} if found else None


def model_card(facts: dict[str, Any], repo_id: str | None = None) -> str:
    """The model card (``README.md``) of an exported model, from ``model_facts``. A URL's
    user:password in any of them (a run record of an older raygpt kept one) stays out."""
    facts = without_credentials(facts)
    info, run, manifest = facts["info"], facts["run"] or {}, facts["manifest"] or {}
    config = info.get("config") or {}
    ref = facts["ref"]
    title = repo_id or info.get("id") or ref
    spec = run.get("spec") or {}
    source = manifest.get("source") or (spec.get("data") or {}).get("source")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["gpt2", "raygpt"]}
    if source in HUB_DATASETS:
        front["datasets"] = [HUB_DATASETS[source]]
    shape = (f"{config.get('n_layer')} layers, {config.get('n_head')} heads, width {config.get('n_embd')}, "
             f"context {config.get('context_length')}, {'tied' if config.get('tie_weights') else 'untied'} head, "
             f"{'with' if config.get('qkv_bias') else 'no'} QKV bias")
    if ref.startswith(OPENAI_PREFIX):
        what = (f"OpenAI's GPT-2 ({ref[len(OPENAI_PREFIX):]}, {_millions(info.get('params'))} parameters: {shape}), "
                "converted to this folder by raygpt.")
    elif facts["fine_tuning"]:
        ft = facts["fine_tuning"]
        what = (f"A GPT-2 ({_millions(info.get('params'))} parameters: {shape}) trained from scratch with raygpt, "
                f"then instruction fine-tuned on {((ft.get('dataset') or {}).get('train'))} examples "
                f"({(ft.get('config') or {}).get('prompt_style', 'alpaca')} prompt) from {ft.get('base_model')}.")
    else:
        what = (f"A GPT-2 ({_millions(info.get('params'))} parameters: {shape}) trained from scratch with raygpt.")

    rows = []
    if manifest or source:
        description = manifest.get("source_description") or source
        rows.append(("data", f"{description} (`{source}`; dataset manifest sha256 "
                             f"`{((run.get('dataset') or {}).get('manifest_sha256') or '?')[:12]}`)"))
    final = run.get("final") or {}
    tokens = final.get("tokens") or info.get("tokens")
    if tokens:
        rows.append(("training tokens", f"{tokens:,}"))
    steps = final.get("step") or info.get("step")
    if steps:
        per_step = (run.get("plan") or {}).get("global_batch_tokens")
        rows.append(("steps", f"{steps:,}" + (f" ({per_step:,} tokens per step)" if per_step else "")))
    hardware = run.get("hardware") or {}
    devices = [d for d in hardware.get("devices") or [] if d]
    if devices:
        rows.append(("hardware", f"{len(devices)}x {max(set(devices), key=devices.count)}"))
    elif hardware.get("workers"):
        rows.append(("hardware", f"{hardware['workers']} {'GPU' if hardware.get('use_gpu') else 'CPU'} workers"))
    cost = run.get("cost") or {}
    if cost.get("wall_clock_s"):
        sessions = cost.get("sessions", 1)
        rows.append(("wall-clock", f"{_duration(cost['wall_clock_s'])}"
                                   + (f" over {sessions} sessions" if sessions > 1 else "")))
    elif final.get("session_s"):
        rows.append(("wall-clock", _duration(final["session_s"])))
    if cost.get("gpu_hours"):
        dollars = f", ${cost['usd']:,.0f} at ${cost['usd_per_gpu_hour']:.2f}/GPU-hour" if cost.get("usd") else ""
        rows.append(("GPU-hours", f"{cost['gpu_hours']:,.1f}{dollars}"))
    if facts["test_loss"]:
        t = facts["test_loss"]
        doc = t["document"]
        rows.append(("test loss", f"{t['test_loss']:.4f} on {doc.get('test_tokens', 0):,} held-out tokens of "
                                  f"`{doc.get('dataset')}` (windows of {doc.get('seq_len')})"))
    if facts["hellaswag"]:
        h = facts["hellaswag"]
        rows.append(("HellaSwag", f"acc_norm {h['acc_norm']:.4f}, acc {h['acc']:.4f} on {h['items']:,} validation "
                                  "items (completion style, as llm.c and build-nanogpt score it)"))
    if facts["ift_score"]:
        s = facts["ift_score"]
        ci = s.get("ci95") or [None, None]
        interval = f" (95% CI {ci[0]:.1f} - {ci[1]:.1f})" if None not in ci[:2] else ""
        rows.append(("IFT score", f"{s['mean']:.1f}/100{interval}, judged by {s.get('judge')} after instruction "
                                  "fine-tuning (`raygpt ift`, `raygpt judge`)"))

    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "", what, ""]
    if rows:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += ["## Use", "", "```python", "from transformers import AutoTokenizer, GPT2LMHeadModel", "",
              f"model = GPT2LMHeadModel.from_pretrained({json.dumps(title)})",
              f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(title)})", "```", ""]
    if spec:
        commit = run.get("git_commit")
        lines += ["## Reproduce", "",
                  f"Trained with raygpt {run.get('raygpt_version', __version__)}"
                  + (f" at commit `{commit}`" if commit else "") + ". Save the run spec below as `spec.yaml`, then:",
                  "", "```bash", f"pip install raygpt=={run.get('raygpt_version', __version__)}",
                  "raygpt data prepare spec.yaml   # the dataset, if it is not in storage yet",
                  "raygpt train spec.yaml", "```", "", "```yaml",
                  yaml.safe_dump(spec, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _millions(n: int | None) -> str:
    return f"{n / 1e6:,.1f}M" if n else "?"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def connect_hub(repo_id: str, timeout_s: float | None = None):
    """An ``HfApi`` for pushing to ``repo_id``, after checking, in one request of at most
    ``timeout_s`` seconds (default ``HUB_TIMEOUT_S``; ``/api/whoami-v2``), that the Hub answers
    and accepts the token.

    The endpoint is ``$HF_ENDPOINT``, else huggingface.co; the token ``$HF_TOKEN``, else the
    one ``hf auth login`` stored. Any problem is one RaygptError, before anything is exported.
    """
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise RaygptError("--push-to-hub: huggingface_hub is not installed: pip install 'raygpt[hub]'") from None
    timeout_s = timeout_s or HUB_TIMEOUT_S
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = get_token()
    if not token:
        raise RaygptError(f"--push-to-hub {repo_id}: no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    request = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return HfApi(endpoint=endpoint, token=token)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            problem = "rejects the token (HTTP 401): set a valid HF_TOKEN or run `hf auth login`"
        else:
            problem = f"answered HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            problem = f"cannot be reached (no answer within {timeout_s:g} s)"
        else:
            problem = f"cannot be reached ({getattr(reason, 'strerror', None) or reason})"
    raise RaygptError(f"--push-to-hub {repo_id}: the Hugging Face Hub at {endpoint} {problem}; nothing was "
                      "exported (export without --push-to-hub, and upload the folder later with `hf upload`)")


def push_folder(api, folder: str, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to ``repo_id`` (created when missing) through ``api``
    (``connect_hub``); returns the repo's URL."""
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=folder, repo_id=repo_id,
                          commit_message=f"Upload {repo_id} exported by raygpt {__version__}")
    except Exception as e:  # HfHubHTTPError, httpx and OS errors: their first line is what helps
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RaygptError(f"--push-to-hub {repo_id}: the upload to {api.endpoint} failed ({detail[:300]}); the export "
                          f"is in {folder}: upload it later with `hf upload {repo_id} {folder}`") from None
    return str(url)
