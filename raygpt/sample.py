"""Text from a model, one token at a time on the KV cache, streamed as it comes.

``stream_tokens`` is the generation loop: one forward pass over the prompt fills a key/value
cache per layer, then each new token costs one position. When the context is full the loop
carries on from the last half of it (a new prefill over those tokens), so a sample may be
longer than the context, as in nanoGPT's ``generate``. Logits are cut to GPT-2's 50,257 tokens,
so a vocabulary padded for speed never yields a token that does not exist. ``TextStream``
turns tokens into text as they arrive (a character may span tokens); ``sample_text`` and
``chat`` are what ``raygpt sample`` and ``raygpt chat`` run.
"""

from __future__ import annotations

import codecs
import contextlib
from typing import Any, Callable, Iterator

import torch

from raygpt.model import GPT, KVCache, pick_next_tokens
from raygpt.prompts import PromptStyle
from raygpt.tokenizer import EOT_ID, VOCAB_SIZE, encode, get_tokenizer


@torch.no_grad()
def stream_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, generator: torch.Generator | None = None, stop: int | None = EOT_ID,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens continuing ``prompt``, each as soon as it is chosen.

    Stops early at ``stop`` (not yielded). A prompt longer than the context keeps its end. The
    model runs in eval mode and gets its mode back when the generator is closed or exhausted;
    ``generator`` is the only randomness used, so sampling never moves the global RNG.
    """
    if max_new_tokens <= 0:
        return
    c = model.config
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    head_dim = c.n_embd // c.n_head
    tokens = list(prompt[-(c.context_length - 1):]) or [EOT_ID]

    def prefill(window: list[int]) -> tuple[list[KVCache], torch.Tensor]:
        caches = [KVCache(1, c.n_head, c.context_length, head_dim, device, dtype) for _ in range(c.n_layer)]
        with autocast():
            logits, _ = model(torch.tensor([window], device=device), caches=caches)
        return caches, logits[0, -1, :VOCAB_SIZE]

    was_training = model.training
    model.eval()
    try:
        caches, logits = prefill(tokens)
        length = len(tokens)
        for _ in range(max_new_tokens):
            token = int(pick_next_tokens(logits[None], temperature, top_k, generator)[0])
            if token == stop:
                return
            yield token
            tokens.append(token)
            if length == c.context_length:  # the cache is full: carry on from its last half
                window = tokens[-(c.context_length // 2):]
                caches, logits = prefill(window)
                length = len(window)
                continue
            # The new token attends to every cached position and itself.
            mask = torch.ones(1, 1, 1, length + 1, dtype=torch.bool, device=device)
            with autocast():
                out, _ = model(torch.tensor([[token]], device=device), caches=caches, cache_start=length, mask=mask)
            logits = out[0, -1, :VOCAB_SIZE]
            length += 1
    finally:
        model.train(was_training)


class TextStream:
    """GPT-2 tokens to text as they arrive: a character split across tokens (UTF-8 bytes of an
    emoji, say) comes out once it is whole."""

    def __init__(self):
        self._tokenizer = get_tokenizer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._decoder.decode(self._tokenizer.decode_single_token_bytes(token))

    def close(self) -> str:
        return self._decoder.decode(b"", final=True)


def sample_text(model: GPT, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None, on_text: Callable[[str], None] | None = None,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> str:
    """The text the model writes after ``prompt`` (``<|endoftext|>`` ends it early), handed to
    ``on_text`` piece by piece as it is generated."""
    stream, pieces = TextStream(), []
    ids = encode(prompt) if prompt else [EOT_ID]  # no prompt: a new document
    for token in stream_tokens(model, ids, max_new_tokens, temperature, top_k, generator, autocast=autocast):
        pieces.append(stream.add(token))
        if on_text and pieces[-1]:
            on_text(pieces[-1])
    pieces.append(stream.close())
    if on_text and pieces[-1]:
        on_text(pieces[-1])
    return "".join(pieces)


def answer(model: GPT, style: PromptStyle, instruction: str, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           on_text: Callable[[str], None] | None = None,
           autocast: Callable[[], Any] = contextlib.nullcontext) -> str:
    """An instruction-tuned model's answer to one instruction in the prompt format it was
    fine-tuned with, streamed to ``on_text``. It ends at ``<|endoftext|>``, or where the model
    starts a new section of the format (``\\n\\n###``): that text is never shown."""
    prompt = style.format_prompt({"instruction": instruction, "input": "", "output": ""})
    stop = "\n\n###"
    stream, text, shown = TextStream(), "", 0
    tokens = stream_tokens(model, get_tokenizer().encode_ordinary(prompt), max_new_tokens, temperature, top_k,
                           generator, autocast=autocast)
    try:
        for token in tokens:
            text += stream.add(token)
            if stop in text:
                text = text[:text.index(stop)]
                break
            # Hold back what could be the start of the stop sequence until the next token says.
            safe = len(text) - next((n for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])), 0)
            if on_text and safe > shown:
                on_text(text[shown:safe])
                shown = safe
        else:
            text += stream.close()
    finally:
        tokens.close()
    if on_text and len(text) > shown:
        on_text(text[shown:])
    return style.extract_response(text)


def chat(model: GPT, style: PromptStyle, read: Callable[[], str | None], write: Callable[[str], None],
         max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
         generator: torch.Generator | None = None, autocast: Callable[[], Any] = contextlib.nullcontext) -> int:
    """Answer instructions from ``read`` (None, ``/exit`` or ``/quit`` ends) until it stops;
    returns the number of turns. Each turn is a new prompt, as the model was fine-tuned on
    single instructions."""
    turns = 0
    while True:
        line = read()
        if line is None or line.strip() in ("/exit", "/quit"):
            return turns
        if not line.strip():
            continue
        answer(model, style, line.strip(), max_new_tokens, temperature, top_k, generator, write, autocast)
        write("\n")
        turns += 1
