"""The run that the fault tests interrupt: a tiny model with dropout on 2 workers, 8
micro-batches of 4 sequences per step, every step logged, a checkpoint every 4 steps. An
uninterrupted run of it (the ``two_worker_losses`` fixture in conftest) is what every
interrupted one must compute, bitwise."""

STEPS = 80


def two_worker_overrides(dataset: str, storage_path: str, name: str, *extra: str) -> list[str]:
    return [f"name={name}", f"storage_path={storage_path}", "model.preset=tiny", "model.dropout=0.1",
            f"train.dataset={dataset}", "train.seq_len=32", "train.global_batch_tokens=1024",
            "train.micro_batch_size=4", "train.num_workers=2", f"train.max_steps={STEPS}", "train.warmup_steps=2",
            "train.lr=3e-3", "train.log_interval=1", "train.val_interval=0", "train.max_failures=0",
            "checkpoint.interval=4", "checkpoint.keep=2", *extra]
