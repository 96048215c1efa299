"""
The Hugging Face GPT-2 layout is a folder with ``config.json`` and ``model.safetensors``
(what ``transformers.GPT2LMHeadModel.from_pretrained`` reads). Its tensor names are
raygpt's (``model.py`` follows OpenAI's naming), with two differences the mapping handles:

- OpenAI's layers are ``Conv1D``s that store a matmul as (in, out); ``nn.Linear`` stores
  (out, in). The four of them per block (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
  ``mlp.c_proj``) are transposed on the way in and on the way out.
- Files saved by ``GPT2LMHeadModel`` prefix the body with ``transformer.``; OpenAI's own
  upload (saved from ``GPT2Model``) does not. Both are read. Old files also carry the causal
  mask buffers ``h.N.attn.bias`` and ``h.N.attn.masked_bias``: constants, not weights, so
  they are skipped.

OpenAI's GPT-2 has a bias on the query/key/value projection and a head tied to the token
embedding; imported models are built that way. Any other tensor in the file is an error
rather than silently dropped: it means the file holds a different architecture than its
``config.json`` describes (more layers, cross-attention, a classification head), and
ignoring it would compute something other than its author's model.

Everything here reads and writes safetensors and JSON directly; ``transformers`` is only
used by the tests, to prove the two implementations compute the same logits.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from raygpt.errors import RaygptError
from raygpt.model import GPT, PRESETS, GPTConfig
from raygpt.storage import write_local_atomically
from raygpt.tokenizer import EOT_ID

log = logging.getLogger(__name__)


# OpenAI's four GPT-2 sizes and the raygpt preset with the same shape.
OPENAI_MODELS = {"gpt2": "gpt2-small", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}


HUB_ORGANISATION = "openai-community"


CONFIG_FILE = "config.json"


WEIGHTS_FILE = "model.safetensors"


SHARD_INDEX_FILE = "model.safetensors.index.json"


BODY_PREFIX = "transformer."


# (in, out)-stored matmuls: transposed between Hugging Face's Conv1D and raygpt's nn.Linear.
CONV1D_WEIGHT = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


# Causal-mask buffers that older checkpoints saved next to the weights.
MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


# tanh-approximated GELU under its two Hugging Face names; raygpt's MLP computes exactly this.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which raygpt's blocks use


def load_openai(name: str, local_dir: str | os.PathLike | None = None) -> GPT:
    """One of OpenAI's GPT-2 models (gpt2, gpt2-medium, gpt2-large, gpt2-xl) as a raygpt ``GPT``.

    The weights come from the first of: ``local_dir``; ``$RAYGPT_HF_DIR/<name>`` when that
    folder exists; the Hugging Face hub (``openai-community/<name>``, only ``config.json`` and
    ``model.safetensors``, cached by ``huggingface_hub``). A leading ``openai:`` is accepted.
    """
    name = name.removeprefix("openai:")
    if name not in OPENAI_MODELS:
        raise RaygptError(f"openai:{name}: unknown OpenAI model (known: {', '.join(OPENAI_MODELS)})")
    if local_dir is not None:
        directory = Path(local_dir)
    elif os.environ.get("RAYGPT_HF_DIR") and (Path(os.environ["RAYGPT_HF_DIR"]) / name).is_dir():
        directory = Path(os.environ["RAYGPT_HF_DIR"]) / name
    else:
        directory = _download_from_hub(name)
    model = load_hf_dir(directory)
    expected = PRESETS[OPENAI_MODELS[name]]
    c = model.config
    if (c.n_layer, c.n_head, c.n_embd) != (expected.n_layer, expected.n_head, expected.n_embd):
        # Not an error: tests and air-gapped mirrors may stand small models in for the real ones.
        log.warning("openai:%s from %s has %d layers, %d heads, width %d; OpenAI's has %d, %d, %d",
                    name, directory, c.n_layer, c.n_head, c.n_embd, expected.n_layer, expected.n_head, expected.n_embd)
    return model


def _download_from_hub(name: str) -> Path:
    repo_id = f"{HUB_ORGANISATION}/{name}"
    how_to_offline = (f"put {CONFIG_FILE} and {WEIGHTS_FILE} of {repo_id} in $RAYGPT_HF_DIR/{name} "
                      "(e.g. `hf download " + repo_id + f" {CONFIG_FILE} {WEIGHTS_FILE} "
                      f"--local-dir $RAYGPT_HF_DIR/{name}` on a machine with access)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RaygptError(f"openai:{name}: huggingface_hub is not installed (pip install huggingface_hub), "
                          f"or {how_to_offline}") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as e:  # network, auth and offline-cache errors come in many classes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RaygptError(f"openai:{name}: cannot download {repo_id} from the Hugging Face hub "
                          f"({type(e).__name__}{': ' + reason if reason else ''}); {how_to_offline}") from None


def load_hf_dir(path: str | os.PathLike, dropout: float = 0.0) -> GPT:
    """A raygpt ``GPT`` from a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``,
    or safetensors shards with ``model.safetensors.index.json``).

    The model computes exactly what ``GPT2LMHeadModel`` computes with these weights. Its head
    is tied to the token embedding when the file has no ``lm_head.weight`` or one equal to
    ``wte``; otherwise it is a separate matrix. ``dropout`` is the fine-tuning dropout of the
    imported model; the file's ``*_pdrop`` values are not used (0.0 follows "Build a Large
    Language Model (from Scratch)" and nanoGPT, which load GPT-2 without dropout).
    Weights are converted to float32. Bad folders raise one ``RaygptError`` that names every
    missing, misshaped or unexpected tensor.
    """
    directory = Path(path)
    hf_config = _read_hf_config(directory)
    tensors = _read_safetensors(directory)
    names = {_normalise(key): key for key in tensors}  # raygpt-style name -> name in the file
    where = directory / (WEIGHTS_FILE if (directory / WEIGHTS_FILE).is_file() else SHARD_INDEX_FILE)

    wte = tensors.get(names.get("transformer.wte.weight", ""))
    lm_head = tensors.get(names.get("lm_head.weight", ""))
    declared_tied = hf_config.get("tie_word_embeddings", True)
    if lm_head is None:
        tied = declared_tied  # untied without a head: reported missing below
    else:
        tied = wte is not None and lm_head.shape == wte.shape and torch.equal(lm_head, wte)
    if not tied and lm_head is not None and wte is not None and declared_tied:
        raise RaygptError(f"{where}: lm_head.weight differs from transformer.wte.weight, but {directory / CONFIG_FILE} "
                          "says tie_word_embeddings: true (transformers would ignore it); set it to false "
                          "to keep the separate head, or drop lm_head.weight")
    config = _gpt_config(hf_config, directory / CONFIG_FILE, tied=tied, dropout=dropout)

    expected = _expected_shapes(config)
    # Name missing tensors the way this file spells the others.
    body_prefix = BODY_PREFIX if not tensors or any(key.startswith(BODY_PREFIX) for key in tensors) else ""
    problems, state = [], {}
    for name, shape in expected.items():
        if name == "lm_head.weight" and config.tie_weights:
            continue
        hf_shape = _hf_shape(name, shape)
        if name not in names:
            spelled = name if name == "lm_head.weight" else body_prefix + name.removeprefix(BODY_PREFIX)
            problems.append(f"{spelled}: missing (expected shape {hf_shape})")
            continue
        tensor = tensors[names[name]]
        if tuple(tensor.shape) != hf_shape:
            problems.append(f"{names[name]}: shape {tuple(tensor.shape)}, expected {hf_shape}")
            continue
        if not tensor.is_floating_point():
            problems.append(f"{names[name]}: dtype {tensor.dtype}, expected a floating-point tensor")
            continue
        state[name] = (tensor.t() if CONV1D_WEIGHT.match(name) else tensor).to(torch.float32).contiguous()
    for name, key in names.items():
        if name not in expected and not MASK_BUFFER.match(name):
            problems.append(f"{key}: unexpected tensor (not part of a {config.n_layer}-layer GPT-2 "
                            f"as {directory / CONFIG_FILE} describes it)")
    if problems:
        raise RaygptError(f"{where}: not a GPT-2 checkpoint raygpt can load:\n  " + "\n  ".join(problems))

    if config.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    # Build on the meta device and adopt the file's tensors: no time spent on a random init.
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _read_hf_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise RaygptError(f"{directory}: no such directory (expected a Hugging Face GPT-2 folder with "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        hf_config = json.loads(path.read_text())
    except FileNotFoundError:
        raise RaygptError(f"{path}: missing (a Hugging Face GPT-2 folder has {CONFIG_FILE} and {WEIGHTS_FILE})") from None
    except (OSError, ValueError) as e:
        raise RaygptError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise RaygptError(f"{path}: expected a JSON object, got {type(hf_config).__name__}")
    return hf_config


def _gpt_config(hf_config: dict, path: Path, tied: bool, dropout: float) -> GPTConfig:
    """raygpt's config for a Hugging Face GPT-2 config, or one error naming every unsupported key."""
    problems = []
    if hf_config.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type: {hf_config['model_type']!r} is not gpt2")
    sizes = {}
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = hf_config.get(key, hf_config.get("n_ctx") if key == "n_positions" else None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key}: expected a positive integer, got {value!r}")
        sizes[key] = value
    if not problems and sizes["n_embd"] % sizes["n_head"]:
        problems.append(f"n_embd: {sizes['n_embd']} is not divisible by n_head={sizes['n_head']}")
    n_inner = hf_config.get("n_inner")
    if n_inner is not None and isinstance(sizes["n_embd"], int) and n_inner != 4 * sizes["n_embd"]:
        problems.append(f"n_inner: {n_inner} unsupported (raygpt's MLP is 4 * n_embd = {4 * sizes['n_embd']} wide)")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in TANH_GELU:
        problems.append(f"activation_function: {activation!r} unsupported (raygpt computes gelu_new)")
    eps = hf_config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon: {eps!r} unsupported (raygpt uses {LAYER_NORM_EPS})")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
        if hf_config.get(key, supported) != supported:
            problems.append(f"{key}: {hf_config[key]!r} unsupported (raygpt needs {str(supported).lower()})")
    if problems:
        raise RaygptError(f"{path}: unsupported GPT-2 config:\n  " + "\n  ".join(problems))
    return GPTConfig(vocab_size=sizes["vocab_size"], context_length=sizes["n_positions"], n_layer=sizes["n_layer"],
                     n_head=sizes["n_head"], n_embd=sizes["n_embd"], dropout=dropout, qkv_bias=True, tie_weights=tied)


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_FILE, directory / SHARD_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RaygptError(f"{index}: not a safetensors shard index ({type(e).__name__}: {e})") from None
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
    else:
        raise RaygptError(f"{single}: missing (a Hugging Face GPT-2 folder has {CONFIG_FILE} and {WEIGHTS_FILE})")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except FileNotFoundError:
            raise RaygptError(f"{file}: missing (listed in {index.name})") from None
        except (SafetensorError, OSError) as e:
            raise RaygptError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors


def _normalise(key: str) -> str:
    """A file's tensor name in raygpt's spelling: the body under ``transformer.``."""
    if key == "lm_head.weight" or key.startswith(BODY_PREFIX):
        return key
    return BODY_PREFIX + key


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """raygpt's tensor names and shapes for ``config``; the model itself is the single source."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if CONV1D_WEIGHT.match(name) else shape


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``raygpt export --dtype`` choices."""


MODEL_CARD_FILE = "README.md"


def export_hf(model: GPT, out_dir: str | os.PathLike, storage=None, provenance: dict[str, str] | None = None,
              dtype: torch.dtype = torch.float32, card: str | None = None) -> list[str]:
    """Write ``model`` as a Hugging Face GPT-2 folder that ``GPT2LMHeadModel.from_pretrained``
    loads and that computes the same logits. Returns the URIs written.

    - Weights are ``dtype`` (float32 unless asked otherwise; bf16 halves the size) in
      ``model.safetensors`` under ``GPT2LMHeadModel``'s names (``transformer.`` prefix),
      Conv1D matrices transposed back to (in, out); ``config.json`` names the dtype.
    - A model without a query/key/value bias gets zero biases: exactly the same function.
    - Tied head: ``tie_word_embeddings: true`` and no ``lm_head.weight`` (as transformers
      saves it). Untied head: ``tie_word_embeddings: false`` and its own ``lm_head.weight``;
      transformers then keeps the two matrices apart (the tests load it and compare logits).
    - ``provenance`` (e.g. the checkpoint ref and step) goes into the safetensors metadata.
    - GPT-2's tokenizer files (``vocab.json``, ``merges.txt``) are copied in when available
      locally, so ``AutoTokenizer.from_pretrained`` works on the folder too.
    - ``card``, when given, is the model card (``README.md``, what the Hub shows).

    ``out_dir`` is a local folder or, with ``storage``, an ``s3://`` prefix. Every file is
    written under a temporary name and renamed, ``config.json`` last: a folder that has a
    ``config.json`` is complete.
    """
    from raygpt.storage import is_remote, join

    out = str(out_dir)
    if is_remote(out):
        if storage is None:
            raise RaygptError(f"{out}: exporting to object storage needs a Storage (raygpt export does this)")
        with tempfile.TemporaryDirectory(prefix="raygpt-export-") as staging:
            names = _write_hf_folder(model, Path(staging), provenance, dtype, card)
            for name in names:  # config.json comes last
                storage.upload(Path(staging) / name, join(out, name))
        return [join(out, name) for name in names]
    directory = Path(out)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaygptError(f"{directory}: cannot create the export folder ({e.strerror})") from None
    return [str(directory / name) for name in _write_hf_folder(model, directory, provenance, dtype, card)]


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``GPT2LMHeadModel``'s names and layouts, as ``dtype``, on the CPU."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the original
    config = model.config
    state = {}
    for name, tensor in model.unpadded_state_dict().items():  # a padded vocabulary's extra rows are not GPT-2's
        if name == "lm_head.weight" and config.tie_weights:
            continue  # transformers re-ties it from wte
        tensor = tensor.detach().to("cpu", dtype)
        state[name] = (tensor.t() if CONV1D_WEIGHT.match(name) else tensor).contiguous()
    if not config.qkv_bias:
        for i in range(config.n_layer):
            state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * config.n_embd, dtype=dtype)
    if not config.tie_weights:
        state["lm_head.weight"] = state["lm_head.weight"].clone()  # safetensors refuses shared storage
    return state


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of ``GPT2LMHeadModel`` for a raygpt model of this config, whose
    weights are stored as ``dtype``."""
    eot = EOT_ID if config.vocab_size > EOT_ID else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,  # the older name, still in OpenAI's own configs
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _write_hf_folder(model: GPT, directory: Path, provenance: dict[str, str] | None, dtype: torch.dtype,
                     card: str | None) -> list[str]:
    """Write the folder's files atomically; returns their names in writing order (config last)."""
    from safetensors.torch import save_file

    from raygpt import __version__

    model = getattr(model, "_orig_mod", model)
    metadata = {"format": "pt", "raygpt_version": __version__}
    metadata.update({key: str(value) for key, value in (provenance or {}).items()})
    written = []

    def commit(name: str, write) -> None:
        write_local_atomically(directory / name, write)
        written.append(name)

    commit(WEIGHTS_FILE, lambda tmp: save_file(hf_state_dict(model, dtype), str(tmp), metadata=metadata))
    for name, source in _tokenizer_files().items():
        commit(name, lambda tmp, source=source: tmp.write_bytes(source.read_bytes()))
    if card is not None:
        commit(MODEL_CARD_FILE, lambda tmp: tmp.write_text(card))
    commit(CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(hf_config(model.config, dtype), indent=2) + "\n"))
    return written


def _tokenizer_files() -> dict[str, Path]:
    """GPT-2's BPE files under the names Hugging Face's GPT2Tokenizer reads, when found locally."""
    from raygpt.tokenizer import bpe_dir_candidates, verify_bpe_dir

    candidates = bpe_dir_candidates()
    if not candidates:
        return {}
    try:
        verify_bpe_dir(candidates[0])
    except RaygptError:
        return {}
    return {"vocab.json": candidates[0] / "encoder.json", "merges.txt": candidates[0] / "vocab.bpe"}
