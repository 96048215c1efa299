"""What a run cost: GPU-hours, wall-clock and dollars, summed over its sessions.

A session holds its workers from start to end (startup, checkpoints and validation
included), so that is what it costs: workers x session seconds. The price per GPU-hour is
``train.gpu_hour_usd`` when the spec gives one, else the on-demand list price of the instance
type that carries the run's GPU in ``cluster.yaml`` (``LIST_PRICES``, dated: prices change,
and spot or reserved capacity costs less). A CPU-only run counts worker-hours, and costs
dollars only at a price the spec gives.
"""

from __future__ import annotations

from typing import Any

LIST_PRICES_DATE = "2025-06"
"""When ``LIST_PRICES`` were read: AWS on-demand, us-east-1, after AWS's June 2025 cut of P4
and P5 prices (https://aws.amazon.com/ec2/pricing/on-demand/)."""

LIST_PRICES = {
    # GPU name as torch reports it (matched in order) -> (instance type, GPUs, USD per instance-hour)
    "A100": ("p4d.24xlarge", 8, 21.96),
    "H100": ("p5.48xlarge", 8, 55.04),
}
"""On-demand list prices of ``cluster.yaml``'s GPU instance types, by the GPU they carry."""


def list_price(device: str | None) -> tuple[float, str] | None:
    """(USD per GPU-hour, where that price comes from) for a GPU name, or None when unlisted."""
    for gpu, (instance, gpus, hourly) in LIST_PRICES.items():
        if device and gpu in device:
            return hourly / gpus, f"{instance} on-demand list price ({LIST_PRICES_DATE}, us-east-1)"
    return None


def run_cost(*, workers: int, use_gpu: bool, session_s: float, device: str | None,
             gpu_hour_usd: float | None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cost of a run after one more session of ``session_s`` seconds on ``workers`` workers,
    added to ``previous`` (the cost its ``run.json`` held before this session)."""
    previous = previous or {}
    hours = workers * session_s / 3600
    if gpu_hour_usd is not None:
        price, source = gpu_hour_usd, "train.gpu_hour_usd"
    elif use_gpu and list_price(device) is not None:
        price, source = list_price(device)
    else:
        price, source = None, None
    usd = None
    if price is not None and (previous.get("usd") is not None or not previous.get("worker_hours")):
        usd = (previous.get("usd") or 0.0) + hours * price  # no dollars for a run with unpriced sessions
    return {
        "sessions": previous.get("sessions", 0) + 1,
        "wall_clock_s": previous.get("wall_clock_s", 0.0) + session_s,
        "worker_hours": previous.get("worker_hours", 0.0) + hours,
        "gpu_hours": previous.get("gpu_hours", 0.0) + (hours if use_gpu else 0.0),
        "usd_per_gpu_hour": price,
        "price_source": source,
        "usd": usd,
    }
