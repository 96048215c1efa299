"""The sweep driver's view: which runs are queued, training, finished or failed, fed by Ray
Tune's trial events (each run's Ray Train reports reach Tune through ``TuneReportCallback``).
A live table on a terminal; a line per event elsewhere (CI, a Ray job's log)."""

from __future__ import annotations

import time
from typing import Any

from ray import tune
from rich.console import Console
from rich.markup import escape
from rich.table import Table


class SweepView:
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None

    # -- the stage's life ------------------------------------------------------------------

    def start(self, sweep, outcomes) -> None:
        for outcome in outcomes:
            self.rows[outcome.run.name] = {"variant": outcome.run.variant, "seed": outcome.run.seed,
                                           "status": "finished before" if outcome.skipped else "queued"}
        skipped = sum(o.skipped for o in outcomes)
        self.note(f"sweep {sweep.name}: {len(sweep.settings)} variant(s) x {len(sweep.config.seeds)} seed(s) = "
                  f"{len(outcomes)} runs under {sweep.folder}" + (f"; {skipped} finished before" if skipped else ""))
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None

    def note(self, text: str) -> None:
        self.console.print(escape(text), highlight=False)

    # -- Tune's events ---------------------------------------------------------------------

    def update(self, run: str, status: str | None = None, result: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        row = self.rows.setdefault(run, {"variant": "?", "seed": "?", "status": "queued"})
        said = []
        if status and status != row["status"]:
            row["status"] = status
            said.append(status)
        if result:
            for key in ("step", "loss", "val_loss", "tokens_per_s"):
                if isinstance(result.get(key), (int, float)):
                    row[key] = result[key]
            if isinstance(result.get("val_loss"), (int, float)):
                said.append(f"step {result.get('step')}: val {result['val_loss']:.4f}")
        if error:
            row["error"] = error
            said.append(error)
        if self._live is not None:
            self._live.update(self._table())
        elif said:
            self.console.print(f"{time.strftime('%H:%M:%S')} {escape(run)}: {escape('; '.join(said))}",
                               highlight=False)

    def tune_callback(self):
        return _TuneEvents(self)

    def _table(self) -> Table:
        table = Table(title="sweep runs", title_justify="left")
        for column in ("run", "status", "step", "loss", "val loss", "tok/s"):
            table.add_column(column, justify="left" if column in ("run", "status") else "right")
        for name, row in self.rows.items():
            table.add_row(escape(name), escape(row["status"]), _num(row.get("step"), "{:,}"),
                          _num(row.get("loss"), "{:.4f}"), _num(row.get("val_loss"), "{:.4f}"),
                          _num(row.get("tokens_per_s"), "{:,.0f}"))
        return table


def _num(value: Any, form: str) -> str:
    return form.format(value) if isinstance(value, (int, float)) else ""


def _run_of(trial) -> str:
    return (trial.config or {}).get("run", str(trial))


class _TuneEvents(tune.Callback):
    """Tune's trial events, told to the view (runs in the driver, beside Tune's controller)."""

    def __init__(self, view: SweepView):
        self.view = view

    def __getstate__(self):  # Tune saves its run config; the view (a console) stays here
        return {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.view.update(_run_of(trial), "training")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.view.update(_run_of(trial), result=result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.view.update(_run_of(trial), "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.view.update(_run_of(trial), "failed")
