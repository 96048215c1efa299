"""The run spec's schema: one pydantic model per concern, a docstring under every field.

A run spec (``jobs/*.yaml``) is a mapping whose top-level keys are ``name``,
``storage_path`` and one section per concern below. Every field has its default here and a
docstring under it saying what it means (pydantic keeps it as the field's description).
Pydantic checks the types, the bounds (``Field(gt=..)``), the registry names (``Literal``)
and refuses unknown keys and NaN or infinite numbers; ``raygpt.config.fields`` says what
each value type admits, and ``raygpt.config.problems`` turns what pydantic finds into one
message per key.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raygpt.config.fields import (
    Distinct,
    Endpoint,
    EvalTask,
    HttpUrl,
    Int,
    LocalPath,
    ModelRef,
    Name,
    PresetName,
    PromptStyleName,
    RunName,
    ScheduleName,
    Seed,
    StoreUri,
    StrategyName,
    Text,
    TrackerName,
    WebSource,
    WorkerCount,
    problem,
)

MAX_CONTEXT_LENGTH = 1 << 17
"""Longest context (and sequence) a spec may ask for: 131,072 positions, 128 times GPT-2's.
What is longer is a typo whose position embedding would not fit in memory."""
MAX_VOCAB_MULTIPLE = 4096
"""``model.vocab_multiple`` pads the vocabulary to a multiple of at most this (64 is the usual)."""
MIN_SHARD_TOKENS = 1024
"""Smaller shards would write a file per handful of tokens and never finish a real corpus."""
MAX_SHARD_TOKENS = 1 << 30
"""A shard is buffered in memory while it is written: 2 GiB at most."""
MAX_TOKENIZER_THREADS = 1024
"""Tokenizer threads of ``raygpt data prepare``."""
MAX_JUDGE_PASSES = 100
"""Judging passes: each one is a call per item and model; more is a typo, not a plan."""
MAX_SEEDS = 100
"""Fine-tuning seeds per base model (each a whole fine-tuning run)."""
MAX_CONCURRENCY = 1024
"""Judge calls in flight at once."""
MAX_BOOTSTRAP_SAMPLES = 100_000
"""Bootstrap resamples: each holds an array of the items, so a typo would fill the memory."""


class SpecSection(BaseModel):
    """What every section of a spec shares: unknown keys, NaN, infinity and loose types are
    refused, and a section written with nothing under it (``train:``) takes its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data):
        return {} if data is None else data


class StorageConfig(SpecSection):
    endpoint_url: Endpoint | None = None
    """S3-compatible endpoint, e.g. ``http://127.0.0.1:8333`` (SeaweedFS, MinIO) or an R2 URL.
    None: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` from the environment, else AWS itself.
    Credentials are never part of a spec: they come from the standard AWS environment,
    config files or an instance profile."""

    region: Name | None = None
    """S3 region. None: ``AWS_REGION``/``AWS_DEFAULT_REGION``, else ``us-east-1``."""

    retry_minutes: float = Field(10.0, ge=0)
    """How long a read or write (checkpoint uploads, ``run.json``, ``metrics.jsonl``, the run's
    lease, Ray Train's own snapshot) is retried, with exponential backoff, while the store does
    not answer; training goes on meanwhile. Access denied or a missing bucket fail at once, and
    so does the preflight's first contact with the store. 0: no retries."""


class ModelConfig(SpecSection):
    preset: PresetName = "gpt2-small"
    """Architecture preset from ``raygpt.model.PRESETS`` (gpt2-small, gpt2-medium, ..., tiny)."""

    context_length: Int | None = Field(None, gt=0, le=MAX_CONTEXT_LENGTH)
    """Override the preset's context length (tokens). None keeps the preset's."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on embeddings, attention and residual outputs. 0 for pretraining at this scale."""

    qkv_bias: bool = False
    """Bias on the query/key/value projection. OpenAI's GPT-2 has one; the book's from-scratch run does not."""

    vocab_multiple: Int | None = Field(None, ge=1, le=MAX_VOCAB_MULTIPLE)
    """Pad the token embedding and the head to a multiple of this many rows (64: 50257 -> 50304:
    5.5% more tokens/s for gpt2-small on an H200). The padding rows are never predicted,
    exports and evaluation drop them, and parameter counts are the unpadded model's. 1: no
    padding. None: 64 for a new run, and for a resumed run what its checkpoint was trained
    with (runs of raygpt before this default resume unpadded)."""

    tie_weights: bool = False
    """Share the token embedding with the output head. OpenAI's GPT-2 ties them (124M params);
    untied gpt2-small has 163M."""


class DataConfig(SpecSection):
    source: LocalPath = "fineweb"
    """``fineweb`` (FineWeb sample-10BT), ``fineweb-edu`` (FineWeb-Edu sample-10BT), ``stdlib``
    (docstrings of the Python standard library: offline and always present), or a local path,
    directory or glob of .txt, .jsonl or .parquet files."""

    output: StoreUri = "data/fineweb"
    """Where shards and ``manifest.json`` go: a local directory or ``s3://bucket/prefix``."""

    tokens: Int | None = Field(None, gt=0)
    """Training-token budget. None with ``chinchilla`` unset: the whole source."""

    chinchilla: PresetName | None = None
    """Model preset whose Chinchilla-optimal budget (20 tokens per parameter) sets ``tokens``."""

    shard_tokens: Int = Field(100_000_000, ge=MIN_SHARD_TOKENS, le=MAX_SHARD_TOKENS)
    """Tokens per shard file (uint16, so 2 bytes each). The last shard of a split may be shorter."""

    val_tokens: Int = Field(10_000_000, ge=0)
    """Tokens in the validation split (periodic loss during training)."""

    test_tokens: Int = Field(10_000_000, ge=0)
    """Tokens in the fixed test split that every run is compared on."""

    heldout_permille: Int = Field(10, ge=1, le=999)
    """Documents whose content hash falls in this many of 1000 buckets are held out for
    validation and test and never enter training, in any run, whatever its budget."""

    text_column: Name = "text"
    """Column or JSON key that holds the document text."""

    num_proc: Int = Field(0, ge=0, le=MAX_TOKENIZER_THREADS)
    """Tokenizer threads (tiktoken encodes outside the GIL, so they run in parallel; the output
    is the same for any number). 0: one per CPU."""

    txt_documents: Literal["file", "paragraphs"] = "file"
    """How a .txt source splits into documents: ``file`` (one document per file, e.g. a book)
    or ``paragraphs`` (blocks separated by blank lines, e.g. one short story held out in parts)."""

    @model_validator(mode="after")
    def _one_budget(self) -> DataConfig:
        if self.tokens is not None and self.chinchilla is not None:
            raise problem("give one token budget, not both", "tokens", "chinchilla")
        return self


class TrainConfig(SpecSection):
    dataset: StoreUri = "data/fineweb"
    """Prepared dataset: the directory or ``s3://`` prefix holding ``manifest.json``."""

    seq_len: Int | None = Field(None, gt=0, le=MAX_CONTEXT_LENGTH)
    """Tokens per training sequence. None: the model's context length."""

    global_batch_tokens: Int = Field(524_288, gt=0)
    """Tokens per optimizer step across all workers (0.5M as in GPT-3 small). Independent of the
    number of workers: gradient accumulation makes up the difference."""

    micro_batch_size: Int = Field(16, gt=0)
    """Sequences per worker per forward/backward pass."""

    max_steps: Int | None = Field(None, gt=0)
    """Optimizer steps. None: ``data.tokens`` of the manifest divided by ``global_batch_tokens``."""

    lr: float = Field(6.0e-4, gt=0)
    """Peak learning rate."""

    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine schedule ends at ``lr * min_lr_ratio``."""

    warmup_steps: Int = Field(700, ge=0)
    """Linear warmup steps from 0 to ``lr``."""

    schedule: ScheduleName = "cosine"
    """Learning-rate decay after warmup, from ``raygpt.train.schedule.SCHEDULES``: cosine,
    linear, constant, or wsd (warmup-stable-decay: the peak rate, then a linear cooldown over the
    last 20% of the steps)."""

    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, applied to 2-D weights only (not biases, LayerNorms)."""

    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""

    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""

    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value. 0 disables clipping."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype. auto: bf16 on GPUs that support it, fp16 with a GradScaler on older GPUs,
    fp32 on CPU (where bitwise-exact resume is checked)."""

    compile: bool | None = None
    """Compile the model with ``torch.compile``. None: on CUDA yes (its kernels are where the
    speed is; the compiled kernels are cached on the node, so a restart loads them), on CPU no."""

    parallel: StrategyName = "ddp"
    """How the model is spread over the workers, from ``raygpt.train.parallel.STRATEGIES``:
    ddp (every worker holds the whole model; gradients are all-reduced)."""

    seed: Seed = 1337
    """Seeds model init, data order and dropout. Data order depends on the seed and step only."""

    log_interval: Int = Field(10, gt=0)
    """Report metrics every this many steps."""

    val_interval: Int = Field(250, ge=0)
    """Compute validation loss every this many steps (and at the end). 0 disables it."""

    val_tokens: Int = Field(1_048_576, gt=0)
    """Validation tokens per evaluation, shared across workers."""

    num_workers: WorkerCount = 1
    """Ray Train workers (one per GPU on GPU clusters): a number, or ``[min, max]`` for an
    elastic run that continues on the workers that remain when capacity shrinks (down to
    ``min``) and grows back to ``max`` when it returns. Any count works: the global batch is
    split into shares that differ by at most one micro-batch, and the trajectory does not
    depend on the count."""

    use_gpu: bool | None = None
    """Train on GPUs. None: yes when the Ray cluster has any."""

    cpus_per_worker: Int = Field(1, gt=0)
    """CPUs reserved per worker (data loading, and the compute on CPU runs)."""

    cache_shards: Int | None = Field(None, gt=0)
    """Downloaded training shards a node keeps on its local disk (least recently used go first;
    a shard that any worker of the node is reading stays). None: all of them, which makes
    restarts on the same node free but needs the dataset's size on each node's disk."""

    max_failures: Int = Field(3, ge=-1)
    """Times Ray Train restarts the workers from the last checkpoint after a worker or node dies."""

    max_preemption_failures: Int = Field(-1, ge=-1)
    """Spot reclaims (a node drained with a preemption notice) the run recovers from, counted
    apart from ``max_failures``. -1: every one."""

    preemption_check_s: float = Field(5.0, gt=0)
    """Seconds of training between checks for a preemption notice (a collective; agreed across
    ranks by counting steps of the measured step time). On a notice the run saves at once and
    then after every step until its node goes, so the resumed run recomputes nothing."""

    preemption_grace_s: float = Field(0.0, ge=0)
    """Seconds the surviving workers may run past a preemption deadline (Ray Train's
    ``FailureConfig.preemption_grace_s``): room for a just-in-time checkpoint to upload."""

    relax_collectives_on_preemption: bool = False
    """Let Ray Train's report and preemption collectives complete without the workers of a
    node being preempted (``FailureConfig.relax_collectives_on_preemption``)."""

    elastic_resize_s: float = Field(60.0, gt=0)
    """Elastic runs: how often Ray Train looks for capacity to grow back to the maximum
    worker count (``ScalingConfig.elastic_resize_monitor_interval_s``)."""

    lease_timeout_s: float = Field(120.0, gt=0)
    """A run being trained holds a lease (``<run>/lease.json``) that its driver renews every
    quarter of this; a second ``raygpt train`` or ``raygpt submit`` of the run refuses while the
    lease was renewed within this many seconds, and takes it over once it was not."""

    take_over: bool = False
    """Take the run's lease over even while another driver renews it (``--set
    train.take_over=true``): for a driver known to be gone whose lease has not expired yet."""

    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient norm is not finite (NaN or inf) never updates the weights,
    on any worker. skip: count it and go on with the next batch, until
    ``max_nonfinite_skips`` such steps in a row stop the run; stop: stop the run at the first.
    A stopped run says at which step; its newest checkpoint holds finite weights."""

    max_nonfinite_skips: Int = Field(10, ge=1)
    """With ``on_nonfinite: skip``, this many non-finite steps in a row stop the run (the
    training has diverged: lower ``train.lr`` or raise ``train.warmup_steps``, then resume).
    In fp16 the GradScaler's own overflow skips count too."""

    stop_at_step: Int | None = Field(None, gt=0)
    """End this session after this many steps (with a checkpoint) while the LR schedule still
    follows ``max_steps``; starting the run again continues it. None: train to ``max_steps``."""

    gpu_hour_usd: float | None = Field(None, ge=0)
    """USD per GPU-hour (per worker-hour on a CPU-only run) for the cost in ``run.json`` and
    ``raygpt report``. None: the dated on-demand list price of the GPU's instance type in
    ``raygpt.cost.LIST_PRICES`` when the GPU is listed there (set this for spot or reserved
    prices), else no dollar figure."""


class CheckpointConfig(SpecSection):
    interval: Int = Field(1000, gt=0)
    """Save a checkpoint every this many steps (and at the end)."""

    interval_minutes: float | None = Field(30.0, gt=0)
    """Also save when this many minutes of training passed since the last save (whichever of
    the two comes first), so what a kill without notice costs is bounded in time on any
    cluster. None: by steps only."""

    keep: Int = Field(2, ge=1)
    """Intact checkpoints kept in storage: after each save the newest ``keep`` intact ones stay,
    with the one the session resumed from; older, damaged and partial folders are deleted."""

    async_upload: bool = True
    """Write checkpoints locally and let Ray upload them in the background, so training does
    not wait on the network."""


class EvalConfig(SpecSection):
    models: list[ModelRef] = []
    """Models to evaluate: run names under ``storage_path``, checkpoint URIs, or ``openai:gpt2``."""

    dataset: StoreUri = "data/fineweb"
    """Prepared dataset whose test split is the yardstick."""

    batch_size: Int = Field(8, gt=0)
    """Sequences per forward pass."""

    max_tokens: Int | None = Field(None, gt=0)
    """Evaluate only the first this many test tokens. None: the whole test split."""

    seq_len: Int | None = Field(None, gt=0, le=MAX_CONTEXT_LENGTH)
    """Tokens per test window, the same for every model. None: the shortest context length
    among the models evaluated together."""

    output: StoreUri | None = None
    """Where ``test_loss.json`` goes. None: ``<storage_path>/eval``."""

    tasks: Annotated[list[EvalTask], Field(min_length=1), Distinct] = ["test_loss"]
    """What ``raygpt eval`` measures, each a Ray task per model: ``test_loss`` (the fixed test
    split, ``test_loss.json``) and ``hellaswag`` (completion-style accuracy as llm.c and
    build-nanogpt score it, ``hellaswag.json``)."""

    hellaswag_data: WebSource = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    """HellaSwag items (JSON lines with ctx, endings, label): the public validation file's URL
    (downloaded once into ``$RAYGPT_CACHE_DIR/hellaswag``; a user:password in a URL is sent as
    HTTP Basic auth), a local path or an ``s3://`` URI."""

    hellaswag_max_items: Int | None = Field(None, gt=0)
    """Score only the first this many HellaSwag items. None: all (10,042 in the validation file)."""


class IftConfig(SpecSection):
    data: WebSource = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
    """Instruction dataset (a JSON list of instruction/input/output objects): a URL (downloaded
    once into ``$RAYGPT_CACHE_DIR/ift``; delete it there to download again), a local path or an
    ``s3://`` URI. Split as the book splits it, in file order: 85% train, 10% test, the rest val.
    A URL's user:password is sent as HTTP Basic auth and recorded nowhere."""

    models: list[ModelRef] = []
    """Base models to fine-tune: run names, checkpoint URIs or ``openai:gpt2``."""

    prompt_style: PromptStyleName = "alpaca"
    """Prompt format from ``raygpt.prompts.PROMPT_STYLES`` (alpaca: the book's chapter 7 format)."""

    epochs: Int = Field(2, gt=0)
    """Passes over the training split."""

    lr: float = Field(5.0e-5, gt=0)
    """AdamW learning rate (constant, as in the book)."""

    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""

    batch_size: Int = Field(8, gt=0)
    """Examples per step, padded with ``<|endoftext|>`` to the longest in the batch."""

    mask_prompt: bool = False
    """Also exclude the prompt tokens from the loss (the book trains on them)."""

    eval_interval: Int = Field(50, gt=0)
    """Validation loss every this many steps, before the first step and after the last;
    early stopping checks it."""

    patience: Int = Field(3, ge=0)
    """Early stopping: validations without improvement before training stops. 0: never stop
    early. Either way the weights with the lowest validation loss are the ones kept."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype. auto: bf16 on GPUs that support it, else fp32."""

    max_new_tokens: Int = Field(256, gt=0)
    """Answer length limit at generation (greedy; an answer also ends at ``<|endoftext|>``)."""

    generation_batch_size: Int = Field(16, gt=0)
    """Test prompts generated together (of similar length, to waste little on padding)."""

    cpus_per_model: Int = Field(1, gt=0)
    """CPUs reserved for each model's Ray task (its torch threads on a CPU-only cluster)."""

    seed: Seed = 123
    """Seeds the batch order and dropout. The split never depends on it."""

    seeds: Annotated[list[Seed], Field(max_length=MAX_SEEDS), Distinct] = []
    """Fine-tune every base model once per seed (each seeds the batch order and dropout): the
    replicates are ``<model>@seed<k>`` under ``output``, and the judge pools them into one score
    per base model whose interval includes the seed-to-seed variance. Empty: once, with
    ``seed``, as ``<model>``."""

    output: StoreUri | None = None
    """Where answers, metrics and fine-tuned models go. None: ``<storage_path>/ift``."""


class JudgeConfig(SpecSection):
    base_url: HttpUrl | None = None
    """OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp). None: OpenAI itself. A user:password
    in it (a proxy in front of a local server) is sent as HTTP Basic auth only when
    ``api_key_env`` is ''; with an API key, the key is sent and the URL's credentials are not
    (both would be one ``Authorization`` header). Either way no record keeps them."""

    api_key_env: Text = "OPENAI_API_KEY"
    """Environment variable that holds the API key. The key itself is never written anywhere.
    Empty ('') for a local server that needs no key."""

    model: Name = "gpt-4o-mini"
    """Judge model."""

    mode: Literal["single", "comparative"] = "comparative"
    """single: the book's prompt, one answer per call, 0-100. comparative: all models' answers
    to one item in one call, shuffled, with the reference answer."""

    passes: Int = Field(3, ge=1, le=MAX_JUDGE_PASSES)
    """Judging passes, each with new answer orders; their agreement is reported."""

    temperature: float = Field(0.0, ge=0)
    """Judge sampling temperature."""

    seed: Seed = 123
    """Seeds answer orders and bootstrap resampling, and is sent to the endpoint."""

    max_tokens: Int = Field(1024, gt=0)
    """Judge reply length limit."""

    concurrency: Int = Field(8, gt=0, le=MAX_CONCURRENCY)
    """Judge calls in flight at once."""

    max_retries: Int = Field(5, ge=0)
    """Retries for unparseable replies, and (by the openai client, with its exponential backoff
    and the server's Retry-After) for timeouts, rate limits and server errors."""

    timeout_s: float = Field(120.0, gt=0)
    """Seconds one judge call may take before it counts as a timeout (and is retried)."""

    structured_output: bool = True
    """Send the JSON schema as ``response_format`` (comparative mode). An endpoint that rejects it
    with 400 is asked in words only. Replies are validated against the schema either way."""

    bootstrap_samples: Int = Field(2000, gt=0, le=MAX_BOOTSTRAP_SAMPLES)
    """Bootstrap resamples of the items for the 95% confidence intervals."""

    price_input_per_mtok: float | None = Field(None, ge=0)
    """USD per million input tokens for the cost estimate. None: the built-in price list
    (OpenAI models); a model missing from it costs "n/a". 0 for a local server."""

    price_output_per_mtok: float | None = Field(None, ge=0)
    """USD per million output tokens (see ``price_input_per_mtok``)."""

    anchors: bool = True
    """Judge the reference answer and an empty answer as hidden candidates (sanity anchors)."""

    answers: list[ModelRef] = []
    """Answer files (from ``raygpt ift``) to judge. Empty: every file under the ift output."""

    pools: dict[Name, list[Name]] = {}
    """Base models scored as one: a pool's name -> the ids of the base models it pools, those
    that differ only in their pretraining seed (``{"wd-0.01": ["wd-0.01-1337", "wd-0.01-1"]}``).
    A pool's score is the mean over its base models of their runs' scores (fine-tuning
    replicates ``<id>@seed<k>`` included); its interval includes the pretraining and the
    fine-tuning seed variance, and the letters and pair comparisons are the pool's. A base
    model in no pool is scored on its own."""

    cache_dir: StoreUri = ".raygpt/judge-cache"
    """Content-keyed cache of judge replies: a re-run is free and an interrupted run resumes."""

    output: StoreUri | None = None
    """Where judgements go. None: ``<storage_path>/judge``."""

    identity: Name | None = None
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

    batch_poll_s: float = Field(60.0, gt=0)
    """Seconds between two looks at a running batch."""

    batch_wait_s: float | None = Field(None, ge=0)
    """Stop polling after this many seconds, leaving the batch running (run again to collect
    it). None: poll until it ends."""


class ReportConfig(SpecSection):
    runs: list[RunName] = []
    """Run names under ``storage_path`` to show (training curves). Empty: all found."""

    output: LocalPath = "report"
    """Local directory for the Markdown, JSON, CSV and PNG files."""

    bootstrap_samples: Int = Field(2000, gt=0, le=MAX_BOOTSTRAP_SAMPLES)
    """Bootstrap resamples of the judged items for the interval of Spearman(test loss, IFT score)."""

    seed: Seed = 123
    """Seeds the bootstrap."""


class LogConfig(SpecSection):
    trackers: Annotated[list[TrackerName], Distinct] = []
    """Experiment trackers that get the run's metrics stream (the de-duplicated one that
    ``metrics.jsonl`` gets; a step trained again after a restart is logged once), and IFT's
    losses: ``tensorboard`` (event files, needs tensorboardX), ``wandb``, ``mlflow`` (the
    ``raygpt[tensorboard]``, ``raygpt[wandb]`` and ``raygpt[mlflow]`` extras). A resumed run
    continues the same tracker run: its id is kept in ``run.json``."""

    project: Name = "raygpt"
    """W&B project and MLflow experiment the runs are logged under."""

    tags: list[Name] = []
    """Tags of the tracker runs, each ``key:value`` or a bare word: W&B's tags as written,
    MLflow's tags (``key`` -> ``value``; a bare word -> ''); TensorBoard has none. A sweep's
    runs carry ``sweep:<name>``, ``variant:<name>`` and ``seed:<seed>`` besides."""

    tensorboard_dir: StoreUri | None = None
    """Where TensorBoard event files go: a local folder or ``s3://`` prefix (uploaded at each
    checkpoint and at the end). None: ``<storage_path>/<name>/tensorboard``."""

    wandb_entity: Name | None = None
    """W&B user or team. None: the account's default entity."""

    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode. None: ``$WANDB_MODE``, else online. Offline runs stay in ``wandb_dir`` until
    ``wandb sync`` uploads them."""

    wandb_dir: LocalPath | None = None
    """Local folder for W&B's run files. None: ``$WANDB_DIR``, else ``.raygpt/wandb`` under the
    folder ``raygpt`` was started from."""

    mlflow_tracking_uri: Name | None = None
    """MLflow tracking server or store (``http://...``, ``sqlite:///...``, ``file:...``). None:
    ``$MLFLOW_TRACKING_URI``, else MLflow's own default (``sqlite:///mlflow.db`` in the folder
    ``raygpt`` was started from, which needs the full ``mlflow`` package). MLflow 3 refuses
    ``file:`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``."""

    sample_prompts: list[Text] = ["Once upon a time,", "The meaning of life is", "def fibonacci(n):"]
    """Prompts that rank 0 continues at each validation; the samples go to the log and the
    trackers. Empty: no samples during training."""

    sample_tokens: Int = Field(32, gt=0)
    """New tokens per training sample."""

    sample_temperature: float = Field(1.0, ge=0)
    """Sampling temperature of the training samples (0: greedy). The samples draw from their
    own generator, seeded by ``train.seed`` and the step, so they never change training."""

    sample_top_k: Int | None = Field(50, gt=0)
    """Sample from the k most likely tokens only. None: from all of them."""


class RunSpec(SpecSection):
    name: RunName = "run"
    """Run name: the folder under ``storage_path`` and the key Ray Train resumes by."""

    storage_path: StoreUri = "runs"
    """Where runs live: a local directory or ``s3://bucket/prefix``."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """The S3-compatible endpoint and region of every ``s3://`` path in the spec."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The architecture trained by ``raygpt train``."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Corpus, token budget and splits for ``raygpt data prepare``."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """Batch, optimizer, schedule and Ray Train settings for ``raygpt train``."""

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """How often training saves and how many checkpoints it keeps."""

    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Models and test split for ``raygpt eval``."""

    ift: IftConfig = Field(default_factory=IftConfig)
    """Instruction fine-tuning and answer generation for ``raygpt ift``."""

    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The LLM judge of ``raygpt judge``."""

    report: ReportConfig = Field(default_factory=ReportConfig)
    """The comparison written by ``raygpt report``."""

    log: LogConfig = Field(default_factory=LogConfig)
    """Experiment trackers and the samples shown during training."""


def worker_range(num_workers: int | list[int]) -> tuple[int, int]:
    """``train.num_workers`` as (min, max): a number n is (n, n)."""
    return (num_workers, num_workers) if isinstance(num_workers, int) else (num_workers[0], num_workers[1])
