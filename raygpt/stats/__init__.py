"""Statistics for comparing models judged on the same items, in parts:

- ``values``: numbers as the JSON summaries hold them (undefined is None, never nan).
- ``ranks``: Spearman and Kendall, from scipy.stats.
- ``nesting``: scores laid out by pretraining seed and fine-tuning seed.
- ``resampling``: the paired bootstrap over items shared by all models, and the Spearman
  interval of test loss against score that also resamples seeds.
- ``multiple_comparisons``: Holm's adjustment and the compact letter display.
- ``variance``: where a score's noise comes from (items, pretraining and fine-tuning seeds,
  judge passes), and intervals of a mean and of a difference that include the seed variance.
- ``judge_checks``: the judge's agreement between passes, its position bias, length control.

Distributions, quantiles and ranks come from scipy.stats; each module says why what it
writes by hand is not taken from a library. The statistics return numbers (a failed
judgement is nan in the score arrays and left out, never a zero; an undefined result is nan
in arrays and None in the JSON-ready dicts); the judge's summary and the report word them.
"""
