"""Run logs: CSV files (always) and TensorBoard (only if the ``tensorboard`` package is installed)."""
import csv
import io
import logging
from pathlib import Path

from ..atomic import write_bytes

logger = logging.getLogger("dsclora")


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
