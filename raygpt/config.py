"""Typed run specs: one dataclass per concern, loaded from YAML and checked all at once.

A run spec (``jobs/*.yaml``) is a mapping whose top-level keys are ``name``,
``storage_path`` and one section per concern below. Every field has a default
here and a docstring under it saying what it means. ``load_spec`` reports every
unknown key, wrong type and missing value in one error that names the file and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raygpt.errors import RaygptError
from raygpt.storage import endpoint_problem, uri_problem, without_userinfo


@dataclass
class StorageConfig:
    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. ``http://127.0.0.1:8333`` (SeaweedFS, MinIO) or an R2 URL.
    None: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` from the environment, else AWS itself.
    Credentials are never part of a spec: they come from the standard AWS environment,
    config files or an instance profile."""

    region: str | None = None
    """S3 region. None: ``AWS_REGION``/``AWS_DEFAULT_REGION``, else ``us-east-1``."""

    retry_minutes: float = 10.0
    """How long a read or write (checkpoint uploads, ``run.json``, ``metrics.jsonl``, the run's
    lease, Ray Train's own snapshot) is retried, with exponential backoff, while the store does
    not answer; training goes on meanwhile. Access denied or a missing bucket fail at once, and
    so does the preflight's first contact with the store. 0: no retries."""


@dataclass
class ModelConfig:
    preset: str = "gpt2-small"
    """Architecture preset from ``raygpt.model.PRESETS`` (gpt2-small, gpt2-medium, ..., tiny)."""

    context_length: int | None = None
    """Override the preset's context length (tokens). None keeps the preset's."""

    dropout: float = 0.0
    """Dropout on embeddings, attention and residual outputs. 0 for pretraining at this scale."""

    qkv_bias: bool = False
    """Bias on the query/key/value projection. OpenAI's GPT-2 has one; the book's from-scratch run does not."""

    vocab_multiple: int = 1
    """Pad the token embedding and the head to a multiple of this many rows (64: 50257 -> 50304,
    faster matmuls on GPUs). The padding rows are never predicted, exports and evaluation drop
    them, and parameter counts are the unpadded model's. 1: no padding."""

    tie_weights: bool = False
    """Share the token embedding with the output head. OpenAI's GPT-2 ties them (124M params);
    untied gpt2-small has 163M."""


@dataclass
class DataConfig:
    source: str = "fineweb"
    """``fineweb`` (FineWeb sample-10BT), ``fineweb-edu`` (FineWeb-Edu sample-10BT), ``stdlib``
    (docstrings of the Python standard library: offline and always present), or a local path,
    directory or glob of .txt, .jsonl or .parquet files."""

    output: str = "data/fineweb"
    """Where shards and ``manifest.json`` go: a local directory or ``s3://bucket/prefix``."""

    tokens: int | None = None
    """Training-token budget. None with ``chinchilla`` unset: the whole source."""

    chinchilla: str | None = None
    """Model preset whose Chinchilla-optimal budget (20 tokens per parameter) sets ``tokens``."""

    shard_tokens: int = 100_000_000
    """Tokens per shard file (uint16, so 2 bytes each). The last shard of a split may be shorter."""

    val_tokens: int = 10_000_000
    """Tokens in the validation split (periodic loss during training)."""

    test_tokens: int = 10_000_000
    """Tokens in the fixed test split that every run is compared on."""

    heldout_permille: int = 10
    """Documents whose content hash falls in this many of 1000 buckets are held out for
    validation and test and never enter training, in any run, whatever its budget."""

    text_column: str = "text"
    """Column or JSON key that holds the document text."""

    num_proc: int = 0
    """Tokenizer processes. 0: one per CPU."""

    txt_documents: Literal["file", "paragraphs"] = "file"
    """How a .txt source splits into documents: ``file`` (one document per file, e.g. a book)
    or ``paragraphs`` (blocks separated by blank lines, e.g. one short story held out in parts)."""


@dataclass
class TrainConfig:
    dataset: str = "data/fineweb"
    """Prepared dataset: the directory or ``s3://`` prefix holding ``manifest.json``."""

    seq_len: int | None = None
    """Tokens per training sequence. None: the model's context length."""

    global_batch_tokens: int = 524_288
    """Tokens per optimizer step across all workers (0.5M as in GPT-3 small). Independent of the
    number of workers: gradient accumulation makes up the difference."""

    micro_batch_size: int = 16
    """Sequences per worker per forward/backward pass."""

    max_steps: int | None = None
    """Optimizer steps. None: ``data.tokens`` of the manifest divided by ``global_batch_tokens``."""

    lr: float = 6.0e-4
    """Peak learning rate."""

    min_lr_ratio: float = 0.1
    """The cosine schedule ends at ``lr * min_lr_ratio``."""

    warmup_steps: int = 700
    """Linear warmup steps from 0 to ``lr``."""

    schedule: str = "cosine"
    """Learning-rate decay after warmup, from ``raygpt.train.schedule.SCHEDULES``: cosine,
    linear, constant, or wsd (warmup-stable-decay: the peak rate, then a linear cooldown over the
    last 20% of the steps)."""

    weight_decay: float = 0.1
    """AdamW weight decay, applied to 2-D weights only (not biases, LayerNorms)."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value. 0 disables clipping."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype. auto: bf16 on GPUs that support it, fp16 with a GradScaler on older GPUs,
    fp32 on CPU (where bitwise-exact resume is checked)."""

    compile: bool | None = None
    """Compile the model with ``torch.compile``. None: on CUDA yes (its kernels are where the
    speed is; the compiled kernels are cached on the node, so a restart loads them), on CPU no."""

    parallel: str = "ddp"
    """How the model is spread over the workers, from ``raygpt.train.parallel.STRATEGIES``:
    ddp (every worker holds the whole model; gradients are all-reduced)."""

    seed: int = 1337
    """Seeds model init, data order and dropout. Data order depends on the seed and step only."""

    log_interval: int = 10
    """Report metrics every this many steps."""

    val_interval: int = 250
    """Compute validation loss every this many steps (and at the end). 0 disables it."""

    val_tokens: int = 1_048_576
    """Validation tokens per evaluation, shared across workers."""

    num_workers: int | list[int] = 1
    """Ray Train workers (one per GPU on GPU clusters): a number, or ``[min, max]`` for an
    elastic run that continues on the workers that remain when capacity shrinks (down to
    ``min``) and grows back to ``max`` when it returns. Any count works: the global batch is
    split into shares that differ by at most one micro-batch, and the trajectory does not
    depend on the count."""

    use_gpu: bool | None = None
    """Train on GPUs. None: yes when the Ray cluster has any."""

    cpus_per_worker: int = 1
    """CPUs reserved per worker (data loading, and the compute on CPU runs)."""

    cache_shards: int | None = None
    """Downloaded training shards a node keeps on its local disk (least recently used go first;
    a shard that any worker of the node is reading stays). None: all of them, which makes
    restarts on the same node free but needs the dataset's size on each node's disk."""

    max_failures: int = 3
    """Times Ray Train restarts the workers from the last checkpoint after a worker or node dies."""

    max_preemption_failures: int = -1
    """Spot reclaims (a node drained with a preemption notice) the run recovers from, counted
    apart from ``max_failures``. -1: every one."""

    preemption_check_s: float = 5.0
    """Seconds of training between checks for a preemption notice (a collective; agreed across
    ranks by counting steps of the measured step time). On a notice the run saves at once and
    then after every step until its node goes, so the resumed run recomputes nothing."""

    preemption_grace_s: float = 0.0
    """Seconds the surviving workers may run past a preemption deadline (Ray Train's
    ``FailureConfig.preemption_grace_s``): room for a just-in-time checkpoint to upload."""

    relax_collectives_on_preemption: bool = False
    """Let Ray Train's report and preemption collectives complete without the workers of a
    node being preempted (``FailureConfig.relax_collectives_on_preemption``)."""

    elastic_resize_s: float = 60.0
    """Elastic runs: how often Ray Train looks for capacity to grow back to the maximum
    worker count (``ScalingConfig.elastic_resize_monitor_interval_s``)."""

    lease_timeout_s: float = 120.0
    """A run being trained holds a lease (``<run>/lease.json``) that its driver renews every
    quarter of this; a second ``raygpt train`` or ``raygpt submit`` of the run refuses while the
    lease was renewed within this many seconds, and takes it over once it was not."""

    take_over: bool = False
    """Take the run's lease over even while another driver renews it (``--set
    train.take_over=true``): for a driver known to be gone whose lease has not expired yet."""

    fail_at_step: int | None = None
    """Fault injection for tests: the last worker exits hard at this step, once per run."""

    stop_at_step: int | None = None
    """End this session after this many steps (with a checkpoint) while the LR schedule still
    follows ``max_steps``; starting the run again continues it. None: train to ``max_steps``."""

    gpu_hour_usd: float | None = None
    """USD per GPU-hour (per worker-hour on a CPU-only run) for the cost in ``run.json`` and
    ``raygpt report``. None: the dated on-demand list price of the GPU's instance type in
    ``raygpt.cost.LIST_PRICES`` when the GPU is listed there (set this for spot or reserved
    prices), else no dollar figure."""


@dataclass
class CheckpointConfig:
    interval: int = 1000
    """Save a checkpoint every this many steps (and at the end)."""

    interval_minutes: float | None = 30.0
    """Also save when this many minutes of training passed since the last save (whichever of
    the two comes first), so what a kill without notice costs is bounded in time on any
    cluster. None: by steps only."""

    keep: int = 2
    """Checkpoints kept in storage; older ones are deleted."""

    async_upload: bool = True
    """Write checkpoints locally and let Ray upload them in the background, so training does
    not wait on the network."""


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=list)
    """Models to evaluate: run names under ``storage_path``, checkpoint URIs, or ``openai:gpt2``."""

    dataset: str = "data/fineweb"
    """Prepared dataset whose test split is the yardstick."""

    batch_size: int = 8
    """Sequences per forward pass."""

    max_tokens: int | None = None
    """Evaluate only the first this many test tokens. None: the whole test split."""

    seq_len: int | None = None
    """Tokens per test window, the same for every model. None: the shortest context length
    among the models evaluated together."""

    output: str | None = None
    """Where ``test_loss.json`` goes. None: ``<storage_path>/eval``."""

    tasks: list[Literal["test_loss", "hellaswag"]] = field(default_factory=lambda: ["test_loss"])
    """What ``raygpt eval`` measures, each a Ray task per model: ``test_loss`` (the fixed test
    split, ``test_loss.json``) and ``hellaswag`` (completion-style accuracy as llm.c and
    build-nanogpt score it, ``hellaswag.json``)."""

    hellaswag_data: str = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    """HellaSwag items (JSON lines with ctx, endings, label): the public validation file's URL
    (downloaded once into ``$RAYGPT_CACHE_DIR/hellaswag``), a local path or an ``s3://`` URI."""

    hellaswag_max_items: int | None = None
    """Score only the first this many HellaSwag items. None: all (10,042 in the validation file)."""


@dataclass
class IftConfig:
    data: str = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
    """Instruction dataset (a JSON list of instruction/input/output objects): URL, local path or
    ``s3://`` URI. Split as the book splits it, in file order: 85% train, 10% test, the rest val."""

    models: list[str] = field(default_factory=list)
    """Base models to fine-tune: run names, checkpoint URIs or ``openai:gpt2``."""

    prompt_style: str = "alpaca"
    """Prompt format from ``raygpt.prompts.PROMPT_STYLES`` (alpaca: the book's chapter 7 format)."""

    epochs: int = 2
    """Passes over the training split."""

    lr: float = 5.0e-5
    """AdamW learning rate (constant, as in the book)."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    batch_size: int = 8
    """Examples per step, padded with ``<|endoftext|>`` to the longest in the batch."""

    mask_prompt: bool = False
    """Also exclude the prompt tokens from the loss (the book trains on them)."""

    eval_interval: int = 50
    """Validation loss every this many steps, before the first step and after the last;
    early stopping checks it."""

    patience: int = 3
    """Early stopping: validations without improvement before training stops. 0: never stop
    early. Either way the weights with the lowest validation loss are the ones kept."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype. auto: bf16 on GPUs that support it, else fp32."""

    max_new_tokens: int = 256
    """Answer length limit at generation (greedy; an answer also ends at ``<|endoftext|>``)."""

    generation_batch_size: int = 16
    """Test prompts generated together (of similar length, to waste little on padding)."""

    cpus_per_model: int = 1
    """CPUs reserved for each model's Ray task (its torch threads on a CPU-only cluster)."""

    seed: int = 123
    """Seeds the batch order and dropout. The split never depends on it."""

    seeds: list[int] = field(default_factory=list)
    """Fine-tune every base model once per seed (each seeds the batch order and dropout): the
    replicates are ``<model>@seed<k>`` under ``output``, and the judge pools them into one score
    per base model whose interval includes the seed-to-seed variance. Empty: once, with
    ``seed``, as ``<model>``."""

    output: str | None = None
    """Where answers, metrics and fine-tuned models go. None: ``<storage_path>/ift``."""


@dataclass
class JudgeConfig:
    base_url: str | None = None
    """OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp). None: OpenAI itself."""

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the API key. The key itself is never written anywhere.
    Empty ('') for a local server that needs no key."""

    model: str = "gpt-4o-mini"
    """Judge model."""

    mode: Literal["single", "comparative"] = "comparative"
    """single: the book's prompt, one answer per call, 0-100. comparative: all models' answers
    to one item in one call, shuffled, with the reference answer."""

    passes: int = 3
    """Judging passes, each with new answer orders; their agreement is reported."""

    temperature: float = 0.0
    """Judge sampling temperature."""

    seed: int = 123
    """Seeds answer orders and bootstrap resampling, and is sent to the endpoint."""

    max_tokens: int = 1024
    """Judge reply length limit."""

    concurrency: int = 8
    """Judge calls in flight at once."""

    max_retries: int = 5
    """Retries for unparseable replies, rate limits and server errors."""

    timeout_s: float = 120.0
    """Seconds one judge call may take before it counts as a timeout (and is retried)."""

    backoff_s: float = 1.0
    """First retry delay after a rate limit, server error or timeout; it doubles (with jitter)
    on each retry, and is never shorter than the server's Retry-After."""

    backoff_max_s: float = 60.0
    """Longest retry delay."""

    structured_output: bool = True
    """Send the JSON schema as ``response_format`` (comparative mode). An endpoint that rejects it
    with 400 is asked in words only. Replies are validated against the schema either way."""

    bootstrap_samples: int = 2000
    """Bootstrap resamples of the items for the 95% confidence intervals."""

    price_input_per_mtok: float | None = None
    """USD per million input tokens for the cost estimate. None: the built-in price list
    (OpenAI models); a model missing from it costs "n/a". 0 for a local server."""

    price_output_per_mtok: float | None = None
    """USD per million output tokens (see ``price_input_per_mtok``)."""

    anchors: bool = True
    """Judge the reference answer and an empty answer as hidden candidates (sanity anchors)."""

    answers: list[str] = field(default_factory=list)
    """Answer files (from ``raygpt ift``) to judge. Empty: every file under the ift output."""

    cache_dir: str = ".raygpt/judge-cache"
    """Content-keyed cache of judge replies: a re-run is free and an interrupted run resumes."""

    output: str | None = None
    """Where judgements go. None: ``<storage_path>/judge``."""

    identity: str | None = None
    """Who the judge is, for the cache key (which leaves the address out, so the same judge on
    another host or port reuses its judgements). None: "openai" for OpenAI itself, else what
    the endpoint lists about ``model`` under /v1/models (id, owned_by and, where given, root,
    parent, meta: vLLM's weights path, llama.cpp's model facts), asked once per address and
    remembered in ``cache_dir``. Name it here when two servers list one model alike but serve
    it differently (two quantizations under one name)."""

    batch: bool = False
    """Send the calls through the OpenAI Batch API (half price, answered within 24 h): one JSONL
    upload, one batch, polled; its id is saved under ``output`` at once, so an interrupted run
    resumes polling the same batch. Replies are parsed, validated and cached as direct ones."""

    batch_poll_s: float = 60.0
    """Seconds between two looks at a running batch."""

    batch_wait_s: float | None = None
    """Stop polling after this many seconds, leaving the batch running (run again to collect
    it). None: poll until it ends."""


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    """Run names under ``storage_path`` to show (training curves). Empty: all found."""

    output: str = "report"
    """Local directory for the Markdown, JSON, CSV and PNG files."""

    bootstrap_samples: int = 2000
    """Bootstrap resamples of the judged items for the interval of Spearman(test loss, IFT score)."""

    seed: int = 123
    """Seeds the bootstrap."""


@dataclass
class LogConfig:
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    """Experiment trackers that get the run's metrics stream (the de-duplicated one that
    ``metrics.jsonl`` gets; a step trained again after a restart is logged once), and IFT's
    losses: ``tensorboard`` (event files, needs tensorboardX), ``wandb``, ``mlflow`` (the
    ``raygpt[tensorboard]``, ``raygpt[wandb]`` and ``raygpt[mlflow]`` extras). A resumed run
    continues the same tracker run: its id is kept in ``run.json``."""

    project: str = "raygpt"
    """W&B project and MLflow experiment the runs are logged under."""

    tensorboard_dir: str | None = None
    """Where TensorBoard event files go: a local folder or ``s3://`` prefix (uploaded at each
    checkpoint and at the end). None: ``<storage_path>/<name>/tensorboard``."""

    wandb_entity: str | None = None
    """W&B user or team. None: the account's default entity."""

    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode. None: ``$WANDB_MODE``, else online. Offline runs stay in ``wandb_dir`` until
    ``wandb sync`` uploads them."""

    wandb_dir: str | None = None
    """Local folder for W&B's run files. None: ``$WANDB_DIR``, else ``.raygpt/wandb`` under the
    folder ``raygpt`` was started from."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or store (``http://...``, ``sqlite:///...``, ``file:...``). None:
    ``$MLFLOW_TRACKING_URI``, else MLflow's own default (``sqlite:///mlflow.db`` in the folder
    ``raygpt`` was started from, which needs the full ``mlflow`` package). MLflow 3 refuses
    ``file:`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``."""

    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time,", "The meaning of life is",
                                                                "def fibonacci(n):"])
    """Prompts that rank 0 continues at each validation; the samples go to the log and the
    trackers. Empty: no samples during training."""

    sample_tokens: int = 32
    """New tokens per training sample."""

    sample_temperature: float = 1.0
    """Sampling temperature of the training samples (0: greedy). The samples draw from their
    own generator, seeded by ``train.seed`` and the step, so they never change training."""

    sample_top_k: int | None = 50
    """Sample from the k most likely tokens only. None: from all of them."""


@dataclass
class RunSpec:
    name: str = "run"
    """Run name: the folder under ``storage_path`` and the key Ray Train resumes by."""

    storage_path: str = "runs"
    """Where runs live: a local directory or ``s3://bucket/prefix``."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    """The S3-compatible endpoint and region of every ``s3://`` path in the spec."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture trained by ``raygpt train``."""

    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, token budget and splits for ``raygpt data prepare``."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, optimizer, schedule and Ray Train settings for ``raygpt train``."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """How often training saves and how many checkpoints it keeps."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Models and test split for ``raygpt eval``."""

    ift: IftConfig = field(default_factory=IftConfig)
    """Instruction fine-tuning and answer generation for ``raygpt ift``."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The LLM judge of ``raygpt judge``."""

    report: ReportConfig = field(default_factory=ReportConfig)
    """The comparison written by ``raygpt report``."""

    log: LogConfig = field(default_factory=LogConfig)
    """Experiment trackers and the samples shown during training."""

    def __post_init__(self) -> None:
        problems = check_spec(self)
        if problems:
            raise RaygptError("invalid run spec:\n  " + "\n  ".join(problems))


def worker_range(num_workers: int | list[int]) -> tuple[int, int]:
    """``train.num_workers`` as (min, max): a number n is (n, n)."""
    return (num_workers, num_workers) if isinstance(num_workers, int) else (num_workers[0], num_workers[1])


def _worker_count_problems(num_workers: Any) -> list[str]:
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, list)):
        return [f"train.num_workers: expected a number or [min, max], got {_describe(num_workers)}"]
    if isinstance(num_workers, int):
        return [] if num_workers > 0 else [f"train.num_workers: must be positive, got {num_workers}"]
    if len(num_workers) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in num_workers):
        return [f"train.num_workers: expected [min, max] (two numbers), got {num_workers!r}"]
    if not 1 <= num_workers[0] <= num_workers[1]:
        return [f"train.num_workers: [min, max] needs 1 <= min <= max, got {num_workers!r}"]
    return []


def check_spec(spec: RunSpec) -> list[str]:
    """Cross-field checks that types alone cannot express; each problem names its key."""
    problems = []
    problem = run_name_problem(spec.name)
    if problem:
        problems.append(f"name: {problem}")
    problems += [f"report.runs[{i}]: {p}" for i, name in enumerate(spec.report.runs) if (p := run_name_problem(name))]
    problems += _finite_problems(spec)
    problems += _uri_problems(spec)
    problems += _seed_problems(spec)
    t = spec.train
    problems += _worker_count_problems(t.num_workers)
    for key in ("global_batch_tokens", "micro_batch_size", "log_interval", "cpus_per_worker", "val_tokens"):
        if getattr(t, key) <= 0:
            problems.append(f"train.{key}: must be positive, got {getattr(t, key)}")
    if t.lr <= 0:
        problems.append(f"train.lr: must be positive, got {t.lr}")
    for key in ("max_steps", "seq_len", "fail_at_step", "stop_at_step", "cache_shards"):
        if getattr(t, key) is not None and getattr(t, key) <= 0:
            problems.append(f"train.{key}: must be positive, got {getattr(t, key)}")
    for key in ("warmup_steps", "val_interval", "weight_decay", "grad_clip"):
        if getattr(t, key) < 0:
            problems.append(f"train.{key}: must not be negative, got {getattr(t, key)}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            problems.append(f"train.{key}: must be in [0, 1) (AdamW's moment decay), got {getattr(t, key)}")
    if not 0 <= t.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if t.max_failures < -1:
        problems.append(f"train.max_failures: must be -1 (restart forever) or more, got {t.max_failures}")
    if spec.model.context_length is not None and spec.model.context_length <= 0:
        problems.append(f"model.context_length: must be positive, got {spec.model.context_length}")
    for key in ("batch_size", "max_tokens", "seq_len"):
        if getattr(spec.eval, key) is not None and getattr(spec.eval, key) <= 0:
            problems.append(f"eval.{key}: must be positive, got {getattr(spec.eval, key)}")
    if not 0 <= spec.model.dropout < 1:
        problems.append(f"model.dropout: must be in [0, 1), got {spec.model.dropout}")
    if spec.checkpoint.keep < 1:
        problems.append(f"checkpoint.keep: must be at least 1, got {spec.checkpoint.keep}")
    if spec.checkpoint.interval_minutes is not None and not spec.checkpoint.interval_minutes > 0:
        problems.append(f"checkpoint.interval_minutes: must be positive or null, got {spec.checkpoint.interval_minutes}")
    for key in ("preemption_check_s", "elastic_resize_s"):
        if not getattr(t, key) > 0:
            problems.append(f"train.{key}: must be positive, got {getattr(t, key)}")
    if not t.lease_timeout_s > 0:
        problems.append(f"train.lease_timeout_s: must be positive, got {t.lease_timeout_s}")
    if not spec.storage.retry_minutes >= 0:
        problems.append(f"storage.retry_minutes: must not be negative, got {spec.storage.retry_minutes}")
    if not t.preemption_grace_s >= 0:
        problems.append(f"train.preemption_grace_s: must not be negative, got {t.preemption_grace_s}")
    if t.max_preemption_failures < -1:
        problems.append(f"train.max_preemption_failures: must be -1 (every one) or more, got {t.max_preemption_failures}")
    if spec.checkpoint.interval <= 0:
        problems.append(f"checkpoint.interval: must be positive, got {spec.checkpoint.interval}")
    if spec.data.tokens is not None and spec.data.chinchilla is not None:
        problems.append("data.tokens and data.chinchilla: give one token budget, not both")
    if not 0 < spec.data.heldout_permille < 1000:
        problems.append(f"data.heldout_permille: must be in 1..999, got {spec.data.heldout_permille}")
    for key in ("tokens", "shard_tokens"):
        if getattr(spec.data, key) is not None and getattr(spec.data, key) <= 0:
            problems.append(f"data.{key}: must be positive, got {getattr(spec.data, key)}")
    for key in ("val_tokens", "test_tokens", "num_proc"):
        if getattr(spec.data, key) < 0:
            problems.append(f"data.{key}: must be non-negative, got {getattr(spec.data, key)}")
    for key in ("epochs", "batch_size", "eval_interval", "max_new_tokens", "generation_batch_size", "cpus_per_model"):
        if getattr(spec.ift, key) <= 0:
            problems.append(f"ift.{key}: must be positive, got {getattr(spec.ift, key)}")
    if spec.ift.lr <= 0:
        problems.append(f"ift.lr: must be positive, got {spec.ift.lr}")
    if spec.ift.weight_decay < 0:
        problems.append(f"ift.weight_decay: must not be negative, got {spec.ift.weight_decay}")
    if spec.ift.patience < 0:
        problems.append(f"ift.patience: must be 0 (no early stopping) or more, got {spec.ift.patience}")
    if spec.judge.passes < 1:
        problems.append(f"judge.passes: must be at least 1, got {spec.judge.passes}")
    for key in ("max_tokens", "concurrency", "timeout_s", "bootstrap_samples"):
        if getattr(spec.judge, key) <= 0:
            problems.append(f"judge.{key}: must be positive, got {getattr(spec.judge, key)}")
    for key in ("max_retries", "temperature", "backoff_s", "backoff_max_s"):
        if getattr(spec.judge, key) < 0:
            problems.append(f"judge.{key}: must not be negative, got {getattr(spec.judge, key)}")
    for key in ("price_input_per_mtok", "price_output_per_mtok"):
        if getattr(spec.judge, key) is not None and getattr(spec.judge, key) < 0:
            problems.append(f"judge.{key}: must not be negative, got {getattr(spec.judge, key)}")
    if spec.judge.batch_poll_s <= 0:
        problems.append(f"judge.batch_poll_s: must be positive, got {spec.judge.batch_poll_s}")
    if spec.judge.batch_wait_s is not None and spec.judge.batch_wait_s < 0:
        problems.append(f"judge.batch_wait_s: must not be negative, got {spec.judge.batch_wait_s}")
    if spec.judge.identity is not None and not spec.judge.identity.strip():
        problems.append("judge.identity: must not be empty (leave it out to ask the endpoint)")
    if len(set(spec.ift.seeds)) != len(spec.ift.seeds):
        problems.append(f"ift.seeds: {spec.ift.seeds} lists a seed twice")
    if spec.report.bootstrap_samples <= 0:
        problems.append(f"report.bootstrap_samples: must be positive, got {spec.report.bootstrap_samples}")
    problems.extend(_check_log_eval_and_cost(spec))
    return problems


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run (a folder under ``storage_path`` and Ray Train's key), or None."""
    if not name or name in (".", ".."):
        return f"{name!r} is not a run name: give a folder name such as gpt2-small-run1"
    if "/" in name or "\\" in name:
        return f"{name!r}: a run name is one folder name, without '/' or '\\'"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        return f"{name!r}: a run name holds no control characters (newline, tab, ...)"
    if name != name.strip():
        return f"{name!r}: a run name neither starts nor ends with a space"
    if len(name.encode()) > 200:
        return f"{name[:40]!r}...: a run name has at most 200 bytes (it is a folder name)"
    return None


def _fields_of(section: Any, prefix: str):
    """(key, value) of every field of a section, sections within it included."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields_of(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _finite_problems(spec: RunSpec) -> list[str]:
    """NaN passes every ``<``/``>`` check and infinity most: refuse both in every float field
    (a NaN learning rate would train to a NaN loss, and finish)."""
    return [f"{key}: must be a finite number, got {value}" for key, value in _fields_of(spec, "")
            if isinstance(value, float) and not math.isfinite(value)]


# Storage URIs of a spec, by what they may be: (key, remote allowed, http(s) allowed).
_URI_FIELDS = (("storage_path", True, False), ("data.output", True, False), ("train.dataset", True, False),
               ("eval.dataset", True, False), ("eval.output", True, False), ("eval.hellaswag_data", True, True),
               ("ift.data", True, True), ("ift.output", True, False), ("judge.cache_dir", True, False),
               ("judge.output", True, False), ("report.output", False, False), ("log.tensorboard_dir", True, False),
               ("data.source", False, False))
# Lists of model references (run names, folders, URIs, openai:NAME): only their URIs are checked.
_URI_LIST_FIELDS = ("eval.models", "ift.models", "judge.answers")


def _uri_problems(spec: RunSpec) -> list[str]:
    problems = []
    for key, remote, web in _URI_FIELDS:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(spec, section) if section else spec, name)
        problem = value is not None and uri_problem(value, remote=remote, web=web)
        if problem:
            problems.append(f"{key}: {problem}")
    for key in _URI_LIST_FIELDS:
        section, name = key.split(".")
        problems += [f"{key}[{i}]: {p}" for i, ref in enumerate(getattr(getattr(spec, section), name))
                     if (p := uri_problem(ref))]
    if spec.storage.endpoint_url is not None and (problem := endpoint_problem(spec.storage.endpoint_url)):
        problems.append(f"storage.endpoint_url: {problem}")
    return problems


SEED_LIMIT = 2**32
"""Seeds are in 0..2**32-1: numpy's seed sequences take no negative seed, and the samples
during training seed torch (whose seeds end at 2**64) with ``train.seed * 1_000_003 + step``."""


def _seed_problems(spec: RunSpec) -> list[str]:
    seeds = [("train.seed", spec.train.seed), ("ift.seed", spec.ift.seed), ("judge.seed", spec.judge.seed),
             ("report.seed", spec.report.seed)] + [(f"ift.seeds[{i}]", s) for i, s in enumerate(spec.ift.seeds)]
    return [f"{key}: must be in 0..{SEED_LIMIT - 1}, got {seed}" for key, seed in seeds if not 0 <= seed < SEED_LIMIT]


def _check_log_eval_and_cost(spec: RunSpec) -> list[str]:
    """Checks of the ``log`` section and of the HellaSwag and cost fields."""
    problems = []
    if len(set(spec.log.trackers)) != len(spec.log.trackers):
        problems.append(f"log.trackers: {spec.log.trackers} names a tracker twice")
    if spec.log.sample_tokens <= 0:
        problems.append(f"log.sample_tokens: must be positive, got {spec.log.sample_tokens}")
    if spec.log.sample_temperature < 0:
        problems.append(f"log.sample_temperature: must not be negative, got {spec.log.sample_temperature}")
    if spec.log.sample_top_k is not None and spec.log.sample_top_k <= 0:
        problems.append(f"log.sample_top_k: must be positive, got {spec.log.sample_top_k}")
    if not spec.log.project:
        problems.append("log.project: must not be empty")
    if not spec.eval.tasks or len(set(spec.eval.tasks)) != len(spec.eval.tasks):
        problems.append(f"eval.tasks: {spec.eval.tasks}: name each task once (test_loss, hellaswag)")
    if spec.eval.hellaswag_max_items is not None and spec.eval.hellaswag_max_items <= 0:
        problems.append(f"eval.hellaswag_max_items: must be positive, got {spec.eval.hellaswag_max_items}")
    if spec.train.gpu_hour_usd is not None and spec.train.gpu_hour_usd < 0:
        problems.append(f"train.gpu_hour_usd: must not be negative, got {spec.train.gpu_hour_usd}")
    return problems


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> dataclasses, collecting every problem before raising.


MAX_SPEC_BYTES = 1 << 20
"""A run spec is a few kilobytes; reading stops after this many bytes, so a wrong path
(``/dev/zero``, a dataset shard) fails at once instead of filling the memory."""

MAX_YAML_DEPTH = 32
"""Nesting deeper than this is refused: the deepest spec value is a list in a section, and
PyYAML composes nested nodes recursively (10,000 levels raise RecursionError)."""

MAX_PROBLEMS_SHOWN = 25
"""A fuzzed or badly generated spec can have thousands of problems; the first ones are shown."""


class _SpecLimitError(yaml.MarkedYAMLError):
    """Well-formed YAML that raygpt will not read: too deep, or a value Python cannot hold."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses deep nesting and unreadable values (an integer of
    5,000 digits, the date 2024-13-45) with an error that points at the line, instead of a
    RecursionError or ValueError without one."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _SpecLimitError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                      self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as e:
            reason = str(e).split(";")[0]  # Python's int limit adds advice about sys.set_int_max_str_digits
            raise _SpecLimitError(None, None, f"{_shorten(str(node.value))} cannot be read ({reason})",
                                  node.start_mark) from None


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
    kind = "" if isinstance(e, _SpecLimitError) else "malformed YAML: "
    return f"{at} {kind}{getattr(e, 'problem', None) or str(e)}"


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file: at most ``MAX_SPEC_BYTES``, UTF-8, each failure one RaygptError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise RaygptError(f"{path}: cannot read run spec ({getattr(e, 'strerror', None) or e})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise RaygptError(f"{path}: larger than {MAX_SPEC_BYTES // 1024} KiB; is it really a run spec (YAML)?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RaygptError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                          "a run spec is a YAML file") from None


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> RunSpec:
    """Load a run spec from YAML (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    Overrides look like ``train.lr=3e-4``; values are parsed as YAML.
    """
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        text = read_spec_text(path)
        try:
            raw = _parse_yaml(text)
        except yaml.YAMLError as e:
            raise RaygptError(f"{where}:{_yaml_problem(e)}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RaygptError(f"{where}: a run spec is a mapping of sections, got {_describe(raw)}")
    problems: list[str] = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {_shorten(item)}: expected KEY=VALUE, e.g. train.lr=3e-4")
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # absent, or an empty section (``train:`` with nothing under it)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                problems.append(f"--set {_shorten(key)}: {_shorten(part)} is not a section")
                break
        else:
            try:
                node[leaf] = _override_value(value)
            except yaml.YAMLError as e:
                problems.append(f"--set {_shorten(key)}:{_yaml_problem(e)}")
    values = _convert(RunSpec, raw, "", problems)
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise RaygptError(f"{where}: invalid run spec:\n  " + "\n  ".join(shown))
    return values


def _override_value(text: str) -> Any:
    """A ``--set`` value parsed as YAML (numbers, booleans, lists, null); text that is not valid
    YAML, such as a glob ``*.txt``, stays the string it is. Values YAML reads but raygpt
    cannot take (deep nesting, a 5000-digit number) raise the YAMLError."""
    if not text:
        return text
    try:
        return _parse_yaml(text)
    except _SpecLimitError:
        raise
    except yaml.YAMLError:
        return text


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a spec (or any config dataclass)."""
    return dataclasses.asdict(spec)


def _convert(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or '<top>'}: expected a section (mapping), got {_describe(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", problems)
    if problems:
        return None
    if cls is RunSpec:
        try:
            return cls(**kwargs)
        except RaygptError as e:
            problems.extend(str(e).split("\n  ")[1:])
            return None
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _convert(tp, value if value is not None else {}, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: expected one of {', '.join(map(repr, args))}, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {_describe(value)}")
            return value
        return [_coerce(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if value is None:
        problems.append(f"{key}: a value is required")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # YAML reads 1e9 as a string and 1.0e9 as a float: accept either when integral.
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                as_float = None
            if isinstance(value, bool) or as_float is None or not as_float.is_integer():
                problems.append(f"{key}: expected an integer, got {_describe(value)}")
                return value
            value = int(as_float)
        if not -INT_LIMIT <= value < INT_LIMIT:
            problems.append(f"{key}: {_shorten(str(value))} is out of range (integers fit in 64 bits)")
        return value
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {_describe(value)}")
            return value
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond 1e308
            problems.append(f"{key}: expected a number, got {_describe(value)}")
            return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {_describe(value)}")
        return value
    return value


INT_LIMIT = 2**63
"""Integer fields fit in 64 bits (what torch, numpy and Ray's resource counts hold)."""


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    return f"{_shorten(text)} ({type(value).__name__})"


def _shorten(text: str, limit: int = 60) -> str:
    """A value as a message shows it: a 5000-digit number or a pasted file is cut short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def recorded_spec(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as run records and checkpoints keep it: the endpoint without any user:password."""
    resolved = spec_to_dict(spec)
    resolved["storage"]["endpoint_url"] = without_userinfo(resolved["storage"]["endpoint_url"])
    return resolved
