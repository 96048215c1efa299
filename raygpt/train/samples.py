"""The samples a run shows at each validation: rank 0 continues ``log.sample_prompts``.

They come from the bare model in eval mode, on their own generator seeded by the run's seed
and the step: the same run shows the same samples at the same step, and sampling never
touches the random state that dropout and data order depend on, so a resumed run still
computes the same losses.
"""

from __future__ import annotations

import torch

from raygpt.sample import sample_text


def training_samples(w) -> list[dict[str, str]]:
    """``[{"prompt", "text"}]`` for the worker ``w`` (a ``raygpt.train.step.Worker``) at its step."""
    log = w.spec.log
    generator = torch.Generator(device=w.device).manual_seed(w.spec.train.seed * 1_000_003 + w.state.step)
    return [{"prompt": prompt,
             "text": sample_text(w.model, prompt, log.sample_tokens, log.sample_temperature, log.sample_top_k,
                                 generator, autocast=w.precision.autocast)}
            for prompt in log.sample_prompts]
