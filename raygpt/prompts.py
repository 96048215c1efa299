"""Prompt formats for instruction fine-tuning, as small named classes with a version string.

A fine-tuned model only answers well in the format it was trained on, and a judgement is only
comparable with another made on answers to the same prompts, so a format is named and
versioned (litgpt's ``PromptStyle`` idea): answers files record ``name`` and ``version``, and a
changed template gets a new version instead of silently changing old results.
"""

from __future__ import annotations

from typing import Mapping

from raygpt.errors import RaygptError

Entry = Mapping[str, str]
"""One instruction example: ``instruction``, ``input`` (may be empty) and ``output``."""


class PromptStyle:
    """How an instruction example becomes training text, and a generation back an answer."""

    name: str = ""
    version: str = ""

    def format_prompt(self, entry: Entry) -> str:
        """What the model sees before its answer: the instruction, the input and the answer header."""
        raise NotImplementedError

    def format_training_text(self, entry: Entry) -> str:
        """The prompt followed by the reference answer: one training sequence (before the end token)."""
        return self.format_prompt(entry) + entry["output"]

    def extract_response(self, generated_text: str) -> str:
        """The answer in the text a model generated after ``format_prompt``."""
        return generated_text.strip()


class AlpacaPrompt(PromptStyle):
    """The Alpaca format exactly as "Build a Large Language Model (from Scratch)", chapter 7, writes it.

    The book's ``format_input(entry) + f"\\n\\n### Response:\\n{entry['output']}"`` is the training
    text. At generation the prompt ends with the response header, so the model starts right at
    its answer: the same tokens as the start of the training text.
    """

    name = "alpaca"
    version = "1"
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    response_header = "\n\n### Response:\n"

    def format_input(self, entry: Entry) -> str:
        """The book's ``format_input``: preamble, instruction, and the input only when it is non-empty."""
        text = f"{self.preamble}\n\n### Instruction:\n{entry['instruction']}"
        if entry["input"]:
            text += f"\n\n### Input:\n{entry['input']}"
        return text

    def format_prompt(self, entry: Entry) -> str:
        return self.format_input(entry) + self.response_header

    def extract_response(self, generated_text: str) -> str:
        # The book prompts without the header and strips the one the model writes; a model
        # fine-tuned that way may still repeat it, so it goes here too.
        text = generated_text.strip()
        header = self.response_header.strip()
        if text.startswith(header):
            text = text[len(header):].strip()
        return text


PROMPT_STYLES: dict[str, type[PromptStyle]] = {cls.name: cls for cls in (AlpacaPrompt,)}


def get_prompt_style(name: str) -> PromptStyle:
    """The prompt format registered under ``name`` (``ift.prompt_style``)."""
    if name not in PROMPT_STYLES:
        raise RaygptError(f"ift.prompt_style: unknown prompt style {name!r} (known: {', '.join(PROMPT_STYLES)})")
    return PROMPT_STYLES[name]()
