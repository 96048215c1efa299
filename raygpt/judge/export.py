"""The answers in AlpacaEval's format, to score them with AlpacaEval's own tooling.

``raygpt judge SPEC --export-alpaca-eval DIR`` writes, for every answers file the judge would
read (replicates included), ``DIR/<model>/model_outputs.json``: a list of ``{"instruction",
"output", "generator", "dataset"}``, what ``alpaca_eval --model_outputs`` reads; and
``DIR/reference_outputs.json``, the dataset's reference answers (generator ``reference``),
for ``--reference_outputs``. AlpacaEval has no input field: an item's input follows its
instruction after a blank line, as AlpacaEval's own instructions carry it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from raygpt.config import RunSpec
from raygpt.judge.answers import AnswerSet, check_aligned, load_answer_sets
from raygpt.storage import Storage, join

MODEL_OUTPUTS_FILE = "model_outputs.json"
REFERENCE_OUTPUTS_FILE = "reference_outputs.json"


def export_alpaca_eval(spec: RunSpec, storage: Storage, output: str) -> list[str]:
    """Write the AlpacaEval files under ``output`` (a local folder or ``s3://``); their URIs."""
    sets = load_answer_sets(spec, storage)
    check_aligned(sets)
    dataset = _dataset_name(sets[0])
    written = []
    for answers in sets:
        uri = join(output, answers.model, MODEL_OUTPUTS_FILE)
        storage.write_json(uri, [{"instruction": _instruction(item), "output": item["response"],
                                  "generator": answers.model, "dataset": dataset} for item in answers.items])
        written.append(uri)
    uri = join(output, REFERENCE_OUTPUTS_FILE)
    storage.write_json(uri, [{"instruction": _instruction(item), "output": item["output"], "generator": "reference",
                              "dataset": dataset} for item in sets[0].items])
    return written + [uri]


def _instruction(item: dict) -> str:
    return f"{item['instruction']}\n\n{item['input']}" if item.get("input") else item["instruction"]


def _dataset_name(answers: AnswerSet) -> str:
    source = answers.dataset.get("source")
    return PurePosixPath(source).stem if source else "raygpt"
