"""What a training run reports, on rank 0: ``log.csv``, TensorBoard and the console.

On a terminal the console shows a tqdm bar; anywhere else (``nohup``, a cluster job, CI, a notebook
run by papermill) one plain line every ``log.every`` steps::

    step 120/200  loss 12.3456  lr 0.0812  head_lr 0.0812  1,234 img/s  elapsed 1m02s  ETA 41s

Every evaluation is one line in both cases (accuracy and its spread over the folds in percent, the
AUC, TAR at FAR 1e-3 when the set has the impostor pairs to support it), and the run ends with a
summary naming the checkpoint and metrics files and the command that evaluates the run.
"""

from __future__ import annotations

import csv
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pfclib.config import TrainConfig
from pfclib.io import atomic_path

__all__ = ["CsvLog", "TrainLog", "format_duration", "format_eval"]


def format_duration(seconds: float) -> str:
    """``"41s"``, ``"1m02s"``, ``"2h05m"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_eval(name: str, res: dict[str, Any]) -> str:
    """One line for a verification result (:func:`pfclib.eval.evaluate_verification`)."""
    text = f"{name}: acc {100 * float(res['acc']):.2f}% ± {100 * float(res.get('acc_std', 0.0)):.2f}"
    if res.get("auc") is not None:
        text += f"  AUC {float(res['auc']):.4f}"
    tar = (res.get("tar_at_far") or {}).get("1e-3")
    if tar is not None:
        text += f"  TAR@FAR=1e-3 {100 * float(tar):.2f}%"
    elif res.get("tar_at_far") is not None:
        text += "  TAR@FAR=1e-3 n/a (fewer than 1,000 impostor pairs)"
    if res.get("num_pairs") is not None:
        text += f"  ({int(res['num_pairs']):,} pairs)"
    return text


class CsvLog:
    """Rank-0 CSV log, one row per logged step, flushed as it goes. On resume, rows beyond the
    resumed step (written by the interrupted run after its last checkpoint) are dropped."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int | None):
        self.path, self.fields = path, list(fields)
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields, restval="", extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TrainLog:
    """The run's reporting. Every method is a no-op unless ``active`` (rank 0).

    Args:
        config: the run's configuration (``log``, ``eval`` sections, ``output_dir``).
        out_dir: the resolved output folder.
        active: True on rank 0.
        vnames: names of the verification sets (CSV columns).
        start_step, end_step, total_steps: this run's range of optimizer steps.
        resumed: True when the run continues a checkpoint (the CSV keeps its earlier rows).
        images_per_step: global images per optimizer step.
        extra_losses: names of the run's other per-step losses (e.g. ``"quality_loss"`` with
            CR-FIQA's branch): a CSV column and a TensorBoard scalar ``train/<name>`` each, filled
            from :meth:`step`'s ``extra``.
        stream: where console lines go (default: ``sys.stdout``, flushed per line).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: Path,
        *,
        active: bool,
        vnames: Sequence[str],
        start_step: int,
        end_step: int,
        total_steps: int,
        resumed: bool,
        images_per_step: int,
        extra_losses: Sequence[str] = (),
        stream=None,
    ):
        self.config, self.out_dir, self.active = config, out_dir, active
        self.start_step, self.end_step, self.total_steps = start_step, end_step, total_steps
        self.images_per_step = images_per_step
        self.extra_losses = list(extra_losses)
        self.stream = stream
        self.csv = self.tb = None
        self.train_time = 0.0
        self._window_time, self._window_steps = 0.0, 0
        show_bar = config.log.progress == "on" or (config.log.progress == "auto" and sys.stderr.isatty())
        from tqdm.auto import tqdm

        self.bar = tqdm(total=end_step, initial=start_step, disable=not (active and show_bar), desc="train")
        self.plain = active and self.bar.disable
        if not active:
            return
        if config.log.csv:
            fields = ["step", "epoch", "loss", *self.extra_losses, "lr", "head_lr", "grad_norm"]
            fields += ["samples_per_s", "elapsed_s"]
            fields += [f"{n}/{k}" for n in vnames for k in ("acc", "acc_std", "auc")]
            self.csv = CsvLog(out_dir / "log.csv", fields, start_step if resumed else None)
        if config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(out_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None
            )

    # ------------------------------------------------------------------ console
    def say(self, text: str) -> None:
        """One console line (through the bar when it is shown, so it is not overwritten)."""
        if not self.active:
            return
        if not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, file=self.stream or sys.stdout, flush=True)

    def warn(self, text: str) -> None:
        """A loud warning: a ``WARNING`` console line and a Python ``UserWarning``."""
        if not self.active:
            return
        self.say(f"WARNING: {text}")
        warnings.warn(text, UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ per step
    def step(
        self,
        done: int,
        *,
        loss: float,
        lr: float,
        head_lr: float,
        grad_norm: float,
        epoch: float,
        seconds: float,
        verification: dict[str, dict] | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        """Record optimizer step ``done`` (steps completed) that took ``seconds``; ``verification``
        is the evaluation made after it, if any; ``extra`` the values of ``extra_losses``."""
        if not self.active:
            return
        extra = dict(extra or {})
        if set(extra) != set(self.extra_losses):
            raise ValueError(f"step {done}: extra losses {sorted(extra)} given, {self.extra_losses} expected")
        self.train_time += seconds
        self._window_time += seconds
        self._window_steps += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
        if verification:
            for name, res in verification.items():
                self.say(f"eval step {done}: {format_eval(name, res)}")
        if not (done % self.config.log.every == 0 or done == self.end_step or verification):
            return
        rate = self.images_per_step * self._window_steps / max(self._window_time, 1e-9)
        if self.plain:
            steps_run = done - self.start_step
            eta = (self.end_step - done) * self.train_time / max(steps_run, 1)
            others = "".join(f"  {name} {value:.4f}" for name, value in extra.items())
            self.say(
                f"step {done}/{self.end_step}  loss {loss:.4f}{others}  lr {lr:.4g}  head_lr {head_lr:.4g}  "
                f"{rate:,.0f} img/s  elapsed {format_duration(self.train_time)}  ETA {format_duration(eta)}"
            )
        row = {
            "step": done,
            "epoch": f"{epoch:.4f}",
            "loss": f"{loss:.6f}",
            **{name: f"{value:.6f}" for name, value in extra.items()},
            "lr": f"{lr:.6g}",
            "head_lr": f"{head_lr:.6g}",
            "grad_norm": f"{grad_norm:.6g}",
            "samples_per_s": f"{rate:.2f}",
            "elapsed_s": f"{self.train_time:.3f}",
        }
        for name, res in (verification or {}).items():
            for k in ("acc", "acc_std", "auc"):
                if res.get(k) is not None:
                    row[f"{name}/{k}"] = f"{float(res[k]):.6f}"
        if self.csv is not None:
            self.csv.write(row)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, done)
            for name, value in extra.items():
                self.tb.add_scalar(f"train/{name}", value, done)
            self.tb.add_scalar("train/lr", lr, done)
            self.tb.add_scalar("train/samples_per_s", rate, done)
            for name, res in (verification or {}).items():
                for k in ("acc", "auc"):
                    if res.get(k) is not None:
                        self.tb.add_scalar(f"verification/{name}/{k}", float(res[k]), done)
        self._window_time, self._window_steps = 0.0, 0

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        self.bar.close()
        if self.csv is not None:
            self.csv.close()
            self.csv = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def summary(
        self, metrics: dict[str, Any], metrics_path: Path, verification_paths: Sequence[Path]
    ) -> None:
        """The final lines: what was done, where the checkpoint and metrics are, what to run next."""
        if not self.active:
            return
        steps, total = metrics["steps"], metrics["total_steps"]
        line = f"done: step {steps}/{total} in {format_duration(metrics['train_time_s'])}"
        if metrics.get("samples_per_s"):
            line += f" ({metrics['samples_per_s']:,.0f} img/s)"
        history = metrics.get("loss_history") or []
        if history:
            line += f", loss {history[0]:.4f} -> {history[-1]:.4f}"
        self.say(line)
        for name, res in (metrics.get("verification") or {}).items():
            self.say(f"  {format_eval(name, res)}")
        checkpoint = metrics.get("checkpoint")
        self.say(f"  checkpoint: {checkpoint or 'none written in this run'}")
        self.say(
            f"  metrics:    {metrics_path}"
            + (f"  (per-step log: {metrics_path.parent / 'log.csv'})" if self.config.log.csv else "")
        )
        q = shlex.quote
        if metrics.get("stopped_early"):
            self.say(
                f"  stopped at step {steps} of {total}; continue with: python -m pfclib.train --config <this config> "
                f"--set output_dir={q(str(self.out_dir))} --resume auto"
            )
        data = " ".join(q(str(p)) for p in verification_paths) if verification_paths else "<pairs.bin>"
        self.say(
            f"  next:       python -m pfclib.eval --checkpoint {q(str(self.out_dir))} --data {data} --out eval.json"
        )
        if not verification_paths:
            self.say(
                "              (make verification pairs from held-out identities with python -m pfclib.data.pairs)"
            )
