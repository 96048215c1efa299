"""The reference recipes add up to what they say: the llm.c / build-nanogpt GPT-2 (124M) run and
the book's 163M run (shapes on the meta device: no memory, no time)."""

from __future__ import annotations

from pathlib import Path

import torch

from raygpt.config import load_spec
from raygpt.model import GPT, config_from_spec
from raygpt.train.plan import plan_run

JOBS = Path(__file__).parent.parent / "jobs"


def params(spec) -> int:
    with torch.device("meta"):
        return GPT(config_from_spec(spec.model)).num_params()


def test_llmc_recipe_is_openais_124m_on_10b_fineweb_edu_tokens_at_half_a_million_per_step():
    spec = load_spec(JOBS / "train-gpt2-124m-llmc.yaml")
    data = load_spec(JOBS / "data-fineweb-edu.yaml")
    assert params(spec) == 124_439_808  # tied head, QKV bias: OpenAI's GPT-2 small
    assert data.data.source == "fineweb-edu" and data.data.output == spec.train.dataset
    plan = plan_run(spec, train_tokens=data.data.tokens, use_gpu=True)
    assert plan.global_batch_tokens == 524_288 and plan.num_workers == 8 and plan.grad_accum_steps == 2
    assert plan.max_steps == 19_073 and abs(plan.max_steps * 524_288 - 10e9) < 524_288
    t = spec.train
    assert (t.lr, t.min_lr_ratio, t.warmup_steps, t.weight_decay, t.beta2, t.grad_clip) == (6e-4, 0.1, 715, 0.1,
                                                                                           0.95, 1.0)
    evaluation = load_spec(JOBS / "eval-gpt2-124m-llmc.yaml")
    assert evaluation.eval.models == [spec.name, "openai:gpt2"]
    assert evaluation.eval.tasks == ["test_loss", "hellaswag"] and evaluation.eval.dataset == spec.train.dataset


def test_the_books_run_is_163m_untied_without_qkv_bias():
    spec = load_spec(JOBS / "train-gpt2-small-fineweb.yaml")
    assert params(spec) == 163_009_536
