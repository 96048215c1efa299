"""Pretraining on Ray Train: the driver plans and launches a run; each worker runs the loop.

- ``plan``: the batch arithmetic; ``schedule``: the LR schedules; ``parallel``: the parallel
  strategies (DDP); ``components``: trainer state, RNG state, the precision policy.
- ``step``: one worker's setup, optimizer step, validation and checkpoint, without Ray.
- ``metrics``: the metrics window, MFU and the run's metrics stream; ``sinks``: its backends.
- ``loop``: the Ray Train worker function; ``launch``: the driver's checks and the
  ``TorchTrainer``; ``progress``: the driver's view; ``runrecord``: ``run.json``.

Global batch ``s`` is a function of (seed, s) alone, so the step is the data cursor, and a
run killed and resumed computes the same per-step losses as an uninterrupted one (bitwise on
CPU).
"""
