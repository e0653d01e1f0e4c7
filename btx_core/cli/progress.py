"""Terminal progress bars (tqdm) fed by the training loop's progress reports: one bar for a
single stage's command, a stack of them for `btx run`, whose branches report from their own threads."""

from __future__ import annotations

import threading

import typer


class ProgressBar:
    """A tqdm bar made on the first report (when the total and the resumed step are known)."""

    def __init__(self, description: str, *, position: int | None = None,
                 lock: threading.Lock | None = None):
        self.description, self.position, self.lock = description, position, lock
        self.bar = None

    def __call__(self, p) -> None:
        if self.lock is None:
            self._show(p)
            return
        with self.lock:  # bars stacked by position redraw each other: one at a time
            self._show(p)

    def _show(self, p) -> None:
        if self.bar is None:
            from tqdm import tqdm

            # The first report comes `log_every` steps in: start the bar's clock that far back (the
            # loop's own pace, from its eta), and average over the whole run rather than the last
            # update, or the first rate shown is those steps over a millisecond.
            self.bar = tqdm(total=p.total_steps, initial=p.resumed_from, desc=self.description, unit="step",
                            position=self.position, dynamic_ncols=True, leave=True, smoothing=0)
            left = p.total_steps - p.step
            if left > 0 and p.step > p.resumed_from:
                self.bar.start_t -= (p.step - p.resumed_from) * p.eta_s / left
            if p.resumed_from:
                self.bar.write(f"{self.description}: resumed from step {p.resumed_from}")
        self.bar.set_postfix(loss=f"{p.loss:.3f}", tok_s=f"{p.tokens_per_s:,.0f}", eta=f"{p.eta_s:,.0f}s",
                             refresh=False)
        self.bar.update(p.step - self.bar.n)
        if p.step >= p.total_steps:  # done: left on screen as it ended, its clock stopped
            self.close()

    @property
    def open(self) -> bool:
        return self.bar is None or not self.bar.disable

    def close(self) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close()
        if kind is KeyboardInterrupt:  # typer would exit 130 without a word
            typer.secho("interrupted: run the same command again to resume from the newest "
                        "checkpoint", err=True, fg="yellow")
            raise typer.Exit(130)


class StageBars:
    """One bar per training stage of a `btx run`, stacked under the ones still running: a stage
    that has finished leaves its last line above them, and nothing redraws it (its clock stays
    at the stage's own time while the next stage logs)."""

    def __init__(self):
        self.bars: list[ProgressBar] = []
        self.lock = threading.Lock()

    def __call__(self, label: str) -> ProgressBar:
        with self.lock:
            bar = ProgressBar(label, position=sum(b.open for b in self.bars), lock=self.lock)
            self.bars.append(bar)
        return bar

    def close(self) -> None:
        for bar in self.bars:
            bar.close()
