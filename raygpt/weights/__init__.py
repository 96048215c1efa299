"""Model weights in and out: training checkpoints, Hugging Face folders, and model references.

- ``checkpoint``: the training-checkpoint format (the sum of the components' states) and
  model-only folders.
- ``hf``: OpenAI's GPT-2 weights in, Hugging Face GPT-2 folders out.
- ``refs``: what a model reference means (a run name, a run/checkpoint/model folder, or
  ``openai:NAME``) and loading the model it names.

``refs`` uses the other two; ``checkpoint`` and ``hf`` know nothing of each other.
"""
