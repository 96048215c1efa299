"""HellaSwag: sentence completion scored the way llm.c and build-nanogpt score it.

An item is a context and four candidate endings, one of them right. A model scores each
ending by the cross-entropy of the ending's tokens given the context. The item counts as
correct under ``acc`` when the right ending has the lowest summed loss, and under
``acc_norm`` when it has the lowest mean (per-token, length-normalised) loss. This is the
completion style of llm.c's ``dev/data/hellaswag.py`` and build-nanogpt's ``hellaswag.py``
(OpenAI's GPT-2 124M: acc_norm about 0.2955 on the 10,042 validation items), not
lm-evaluation-harness's, which normalises by characters; numbers compare with theirs.

The data is the public validation file (``HELLASWAG_VAL_URL``), downloaded once into a
local cache, or any local path or ``s3://`` URI holding the same JSON-lines format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from raygpt.errors import RaygptError
from raygpt.storage import Storage, without_userinfo
from raygpt.storage.download import DOWNLOAD_TIMEOUT_S, default_cache_dir, is_url, read_input
from raygpt.tokenizer import VOCAB_SIZE, encode

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
"""The validation split as llm.c and build-nanogpt download it."""
HELLASWAG_VAL_ITEMS = 10_042
"""Items in ``HELLASWAG_VAL_URL``'s file."""
NUM_ENDINGS = 4


@dataclass(frozen=True)
class Item:
    """One HellaSwag question."""

    ctx: str
    """The context the endings continue."""
    endings: tuple[str, ...]
    """The four candidate endings, as in the file (no leading space)."""
    label: int
    """Index of the right ending, 0-3."""
    ind: int | None = None
    """The item's index in the original dataset, when the file has one."""
    activity_label: str | None = None
    """The ActivityNet or WikiHow category, when the file has one."""


def load_items(source: str, cache_dir: str | Path | None = None, storage: Storage | None = None,
               timeout_s: float = DOWNLOAD_TIMEOUT_S) -> tuple[list[Item], str]:
    """The items of a HellaSwag JSON-lines file, and the file's sha256.

    ``source``: an http(s) URL, downloaded on first use into ``cache_dir`` (default
    ``$RAYGPT_CACHE_DIR/hellaswag``) and read from there afterwards without a request; or a
    local path or ``s3://`` URI, read through ``storage``. Each line holds ``ctx``, ``endings``
    (4) and ``label``; ``ind`` and ``activity_label`` are kept when present. Any problem is one
    ``RaygptError`` naming the file and the line.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir("hellaswag")
    data, name = read_input(source, storage or Storage(), cache, "HellaSwag", "without network access, download the "
                            "file elsewhere and pass its local path (or an s3:// URI) as the HellaSwag source instead",
                            timeout_s)
    # A server can answer 200 with something else (a proxy's login page): say how to retry.
    hint = (f" (downloaded from {without_userinfo(source)}; delete the file to download it again)"
            if is_url(source) else "")
    try:
        items = parse_items(data, name)
        if source == HELLASWAG_VAL_URL and len(items) != HELLASWAG_VAL_ITEMS:
            raise RaygptError(f"{name}: {len(items):,} items, but the HellaSwag validation file has "
                              f"{HELLASWAG_VAL_ITEMS:,}")
    except RaygptError as e:
        raise RaygptError(f"{e}{hint}") from None
    return items, hashlib.sha256(data).hexdigest()


def parse_items(data: bytes, name: str) -> list[Item]:
    """Items from the bytes of a JSON-lines file; ``name`` is the file as errors call it."""
    items = []
    # bytes.splitlines breaks only at \n and \r: a U+2028 inside a JSON string stays in its line.
    for lineno, raw in enumerate(data.splitlines(), start=1):
        where = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RaygptError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RaygptError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        items.append(_item(record, where))
    if not items:
        raise RaygptError(f"{name}: no HellaSwag items (expected one JSON object per line)")
    return items


def _item(record: Any, where: str) -> Item:
    if not isinstance(record, dict):
        raise RaygptError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in record]
    if missing:
        raise RaygptError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise RaygptError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list):
        raise RaygptError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if len(endings) != NUM_ENDINGS:
        raise RaygptError(f"{where}: {len(endings)} endings, expected {NUM_ENDINGS}")
    if not all(isinstance(e, str) for e in endings):
        raise RaygptError(f"{where}: 'endings' must be strings")
    # Some exports (Hugging Face's parquet) store the label as a string.
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise RaygptError(f"{where}: label {record['label']!r} is not an ending index 0-{NUM_ENDINGS - 1}")
    ind, activity = record.get("ind"), record.get("activity_label")
    return Item(ctx=ctx, endings=tuple(endings), label=label,
                ind=ind if isinstance(ind, int) and not isinstance(ind, bool) else None,
                activity_label=activity if isinstance(activity, str) else None)


def render_item(item: Item, context_length: int) -> list[tuple[list[int], int]]:
    """The four rows that score ``item``: per ending, (tokens, how many of the last tokens are scored).

    A row is the context's tokens followed by the ending's, the ending tokenized with a leading
    space as it follows the context in running text (``" " + ending``), as in llm.c. A row
    longer than ``context_length`` is cut from the left, so the context loses its start first;
    a row's first token has no prefix to predict it from and is never scored, so an ending of
    ``context_length`` tokens or more is scored on its last ``context_length - 1``.
    """
    if context_length < 2:
        raise ValueError(f"context_length {context_length}: scoring needs at least 2 positions")
    ctx_tokens = encode(item.ctx)
    if not ctx_tokens:
        raise RaygptError(f"HellaSwag item {item.ind if item.ind is not None else item.ctx!r}: empty context")
    rows = []
    for ending in item.endings:
        ending_tokens = encode(" " + ending)
        tokens = (ctx_tokens + ending_tokens)[-context_length:]
        rows.append((tokens, min(len(ending_tokens), len(tokens) - 1)))
    return rows


def score_items(model: torch.nn.Module, items: Sequence[Item], device: torch.device | str,
                batch_size: int = 16, autocast: Callable[[], Any] = contextlib.nullcontext,
                per_item: bool = False) -> dict[str, Any]:
    """acc and acc_norm of ``model`` (a ``raygpt.model.GPT`` on ``device``) on ``items``.

    Per ending: the cross-entropy of each ending token given all tokens before it, over GPT-2's
    50,257 tokens only (a vocabulary padded for speed never takes probability mass), in fp32
    whatever ``autocast`` does to the forward; summed for ``acc``, averaged over the ending's
    tokens for ``acc_norm``; the prediction is the ending with the lowest (the first on a tie).
    ``batch_size`` items (4 rows each) run through the model at once, right-padded to the
    longest row: attention is causal, so padding changes no scored token. Rows longer than the
    model's context are cut from the left (``render_item``). The model runs in eval mode and
    gets its mode back; the losses stay on the device until one copy at the end.

    Returns ``acc``, ``acc_norm``, ``items``, ``correct``, ``correct_norm`` and, with
    ``per_item``, ``per_item``: per item ``label``, ``pred``, ``pred_norm``, ``sum_loss`` and
    ``mean_loss`` (4 floats each).
    """
    if not items:
        raise RaygptError("HellaSwag: no items to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    context_length = model.config.context_length
    was_training = model.training
    model.eval()
    sums, means = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                rows = [row for item in items[start:start + batch_size] for row in render_item(item, context_length)]
                batch_sum, batch_mean = ending_losses(model, rows, device, autocast)
                sums.append(batch_sum)
                means.append(batch_mean)
    finally:
        model.train(was_training)
    losses = torch.stack([torch.cat(sums), torch.cat(means)]).view(2, len(items), NUM_ENDINGS).cpu()
    sum_loss, mean_loss = losses[0], losses[1]
    labels = torch.tensor([item.label for item in items])
    pred, pred_norm = sum_loss.argmin(dim=1), mean_loss.argmin(dim=1)
    correct, correct_norm = int((pred == labels).sum()), int((pred_norm == labels).sum())
    result: dict[str, Any] = {"acc": correct / len(items), "acc_norm": correct_norm / len(items),
                              "items": len(items), "correct": correct, "correct_norm": correct_norm}
    if per_item:
        result["per_item"] = [{"label": item.label, "pred": p, "pred_norm": pn, "sum_loss": s, "mean_loss": m}
                              for item, p, pn, s, m in zip(items, pred.tolist(), pred_norm.tolist(),
                                                           sum_loss.tolist(), mean_loss.tolist())]
    return result


def ending_losses(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], device: torch.device,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) cross-entropy of each row's scored last tokens, as two (rows,) fp32 tensors on
    ``device``. ``rows`` as ``render_item`` makes them; no host sync."""
    longest = max(len(tokens) for tokens, _ in rows)
    most_scored = max(scored for _, scored in rows)
    idx = torch.zeros(len(rows), longest, dtype=torch.long)
    # Per row, the flat positions whose logits predict its scored tokens, and those tokens, laid
    # out (rows, most_scored) with a mask over the real ones: the loss is taken on these positions
    # only, not on the whole (rows, longest, vocab) grid of which the endings are a small part.
    predict_at = torch.zeros(len(rows), most_scored, dtype=torch.long)
    targets = torch.zeros(len(rows), most_scored, dtype=torch.long)
    mask = torch.zeros(len(rows), most_scored, dtype=torch.bool)
    for r, (tokens, scored) in enumerate(rows):
        n = len(tokens)
        idx[r, :n] = torch.tensor(tokens)
        # The logits at position p predict token p + 1.
        predict_at[r, :scored] = torch.arange(r * longest + n - scored - 1, r * longest + n - 1)
        targets[r, :scored] = torch.tensor(tokens[n - scored:])
        mask[r, :scored] = True
    idx, predict_at, targets, mask = (_to_device(t, device) for t in (idx, predict_at, targets, mask))
    with autocast():
        logits, _ = model(idx)  # (rows, longest, vocab)
    picked = logits.reshape(-1, logits.size(-1)).index_select(0, predict_at.view(-1))
    token_loss = F.cross_entropy(picked[:, :VOCAB_SIZE].float(), targets.view(-1), reduction="none")
    summed = (token_loss.view(mask.shape) * mask).sum(dim=1)
    return summed, summed / mask.sum(dim=1)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory the copy is asynchronous; a pageable one would wait for the GPU every batch.
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
