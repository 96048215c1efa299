"""Ablation sweeps: "which change to the recipe made a better model?", with noise bands.

- ``spec``: the sweep spec (a base run spec, seeds, named variants, stages) and the run spec
  of every (variant, seed), all checked before anything starts.
- ``train``: the training stage, one Ray Tune trial per unfinished run, each driving that
  run's own ``TorchTrainer``; ``progress``: the driver's view of the trials.
- ``pairing``: which runs share their data order and initial weights (checked, not assumed).
- ``compare``: each variant against the baseline seed by seed, the run-to-run noise, the cost.
- ``report``: ``sweep.json``, Markdown, CSV, plots and the terminal tables.
- ``run``: ``raygpt sweep``, the stages in order, each skipping what is done already.
"""
