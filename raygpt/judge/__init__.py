"""``raygpt judge``: score fine-tuned models' answers with an LLM judge, and say how far to trust it.

- ``answers``: the answer sets of ``raygpt ift``, checked to line up item by item, and what
  is scored as one (a base model's fine-tuning replicates, ``judge.pools``).
- ``prompts``: the judge prompts, versioned, and their reply parsers.
- ``client``: the OpenAI-compatible endpoint (the openai client retries HTTP failures), the
  content-keyed cache, prices.
- ``calls``: planning the calls (orders, passes, anchors, cache keys).
- ``run``: making them, and the run from answers to ``summary.json``.
- ``batch``: the same calls through the OpenAI Batch API (``judge.batch``), resumable by batch id.
- ``summary``: the statistics over the judgements (``raygpt.stats``).
- ``wording``: those statistics in sentences, and the terminal table.
- ``export``: the answers in AlpacaEval's ``model_outputs`` format.
"""
