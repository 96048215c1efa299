"""``raygpt judge``: score fine-tuned models' answers with an LLM judge, and say how far to trust it.

- ``answers``: the answer sets of ``raygpt ift``, checked to line up item by item.
- ``prompts``: the judge prompts, versioned, and their reply parsers.
- ``client``: the OpenAI-compatible endpoint: retries, backoff, the content-keyed cache.
- ``run``: planning the calls (orders, passes, anchors) and making them.
- ``batch``: the same calls through the OpenAI Batch API (``judge.batch``), resumable by batch id.
- ``summary``: the statistics over the judgements, and their table.
- ``export``: the answers in AlpacaEval's ``model_outputs`` format.
"""
