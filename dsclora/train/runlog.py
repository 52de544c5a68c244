"""Run logs: CSV files (always) and TensorBoard (only if the ``tensorboard`` package is installed)."""
import csv
import io
import logging
import math
from pathlib import Path

from ..atomic import write_bytes

logger = logging.getLogger("dsclora")

TERMS = ("rec", "ts", "ad")
#: ‖∇ of λ·term‖ over the adapters, measured on the last step of each logging interval.
GRAD_NORMS = tuple(f"grad_{term}" for term in TERMS)
TRAIN_FIELDS = ["iteration", "stage", "lr", "loss", *TERMS, *GRAD_NORMS, "skipped", "it_per_s"]
VALIDATION_FIELDS = ["iteration", "dataset", "psnr", "ssim"]


class CsvLog:
    """Rows with fixed ``fields`` appended to ``path``; the first field is the iteration.

    ``keep_until``: on resume, rows logged after the checkpoint's iteration are dropped (they
    will be logged again); None starts a new file.
    """

    def __init__(self, path: Path, fields: list[str], keep_until: int | None = None):
        self.path, self.fields = Path(path), fields
        rows = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r[fields[0]]) <= keep_until]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(self.path, text.getvalue().encode())  # a kill here keeps the old log whole

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


class TensorBoard:
    """``add_scalars(iteration, {tag: value})`` into ``folder`` if TensorBoard is installed."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("dsclora: TensorBoard logging is off (the tensorboard package is not installed)")
            self.writer = None
        else:
            self.writer = SummaryWriter(str(folder))

    def add_scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLogs:
    """A run's ``train_log.csv``, ``validation.csv``, TensorBoard scalars and ``loss_curve.png``
    in ``run_dir``; ``keep_until``: see CsvLog. ``log_lines``: also report each row as a log line
    (when no progress bar shows)."""

    def __init__(self, run_dir: Path, total_iterations: int, keep_until: int | None = None):
        self.run_dir, self.total_iterations, self.log_lines = Path(run_dir), total_iterations, False
        self.train = CsvLog(self.run_dir / "train_log.csv", TRAIN_FIELDS, keep_until)
        self.validation = CsvLog(self.run_dir / "validation.csv", VALIDATION_FIELDS, keep_until)
        self.tensorboard = TensorBoard(self.run_dir / "tensorboard")

    def train_row(self, iteration: int, stage: int, lr: float, means: dict, skipped: int, it_per_s: float) -> None:
        """One train_log.csv row: the interval's mean loss terms (missing: none was finite)."""
        row = {"iteration": iteration, "stage": stage, "lr": f"{lr:.6g}",
               **{k: f"{v:.6g}" for k, v in means.items()}, "skipped": skipped, "it_per_s": f"{it_per_s:.3f}"}
        self.train.write(row)
        if self.log_lines:
            logger.info("dsclora: iteration %d/%d (stage %d): loss %s, %.2f it/s, %d skipped",
                        iteration, self.total_iterations, stage, row.get("loss", "nan"), it_per_s, skipped)
        self.tensorboard.add_scalars(iteration, {f"loss/{k}": v for k, v in means.items() if math.isfinite(v)})

    def validation_rows(self, iteration: int, results: dict[str, dict]) -> None:
        """validation.csv rows and scalars of ``results`` {dataset: {"psnr", "ssim"}}."""
        for name, r in results.items():
            self.validation.write({"iteration": iteration, "dataset": name,
                                   "psnr": f"{r['psnr']:.4f}", "ssim": f"{r['ssim']:.6f}"})
            self.tensorboard.add_scalars(iteration, {f"val/{name}/psnr": r["psnr"], f"val/{name}/ssim": r["ssim"]})

    def plot_losses(self) -> Path:
        """``loss_curve.png``: the logged loss terms over the iterations."""
        from .plot import plot_curves

        rows = self.train.read()
        xs = [int(r["iteration"]) for r in rows]
        series = {}
        for key in ("loss", *TERMS):
            values = [float(r[key]) if r[key] else float("nan") for r in rows]
            if any(math.isfinite(v) for v in values):
                series[key] = (xs, values)
        return plot_curves(series, self.run_dir / "loss_curve.png", title="DSCLoRA training loss")

    def close(self) -> None:
        self.tensorboard.close()
