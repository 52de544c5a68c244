"""Which DSCLoRA recipe improves SPAN-Tiny under a fixed CPU budget? (the fine-tuning study)

Fine-tunes SPAN-Tiny (ch26, the paper's base) with SPAN ch28 as the teacher on the shared training
photos (train_Sun80 + train_BSD68, minus a few held out for validation), one run per variant, all
with the same budget (iterations x batch x HR patch), and prints the PSNR (Y, border 4) change
against the base on Set5, Set14, Urban100_10 and Manga109_10 for

- ``last``: the EMA model at the end of the run (what the recipe itself does);
- ``export``: the trainer's export, the best validated model with the base (iteration 0) among
  the candidates (what a user gets).

Every model is evaluated on the plain PyTorch path (the reference, to ±0.0005 dB), so the deltas
are not blurred by kernel rounding. Each variant's numbers are kept in ``OUT/<variant>.json``
(a rerun skips finished variants; ``--force`` redoes them) and the table is written to ``--table``.

    python bench/study_finetune.py --list
    python bench/study_finetune.py --variants paper,no-ad,dscf --iterations 300
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("DSCLORA_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
BASE, TEACHER = "spantiny_ch26_x4_ntire24.pth", "span_ch28_x4_ntire24.pth"
TRAIN_SETS, TEST_SETS = ("train_Sun80", "train_BSD68"), ("Set5", "Set14", "Urban100_10", "Manga109_10")
HELD_OUT_PER_SET = 4

#: name -> configuration overrides on top of the study's base configuration (the trainer defaults).
VARIANTS = {
    "paper": [],
    "lr-1e-5": ["stages.0.lr=1e-5"],
    "lr-3e-6": ["stages.0.lr=3e-6"],
    "lr-1e-5-no-ad": ["stages.0.lr=1e-5", "loss.ad=0"],
    "lr-1e-5-dscf": ["stages.0.lr=1e-5", 'loss.features="dscf"'],
    "lr-1e-5-ts-only": ["stages.0.lr=1e-5", "loss.rec=0", "loss.ts=1"],
    "lr-1e-5-ts-only-no-ad": ["stages.0.lr=1e-5", "loss.rec=0", "loss.ts=1", "loss.ad=0"],
    "lr-1e-5-ts-only-dscf": ["stages.0.lr=1e-5", "loss.rec=0", "loss.ts=1", 'loss.features="dscf"'],
    "lr-1e-5-ts-only-ad-0.001": ["stages.0.lr=1e-5", "loss.rec=0", "loss.ts=1", "loss.ad=0.001"],
    "lr-3e-6-ts-only": ["stages.0.lr=3e-6", "loss.rec=0", "loss.ts=1"],
    "lr-1e-5-ts-rec-0.1": ["stages.0.lr=1e-5", "loss.rec=0.1", "loss.ts=1"],
    "lr-3e-5-ts-only-ad-0.001": ["stages.0.lr=3e-5", "loss.rec=0", "loss.ts=1", "loss.ad=0.001"],
    "lr-3e-6-ts-only-ad-0.001": ["stages.0.lr=3e-6", "loss.rec=0", "loss.ts=1", "loss.ad=0.001"],
}


def split_training_images(out: Path) -> tuple[list[str], list[str]]:
    """(training folders, held-out folder): symlinks under ``out/data``, the first
    HELD_OUT_PER_SET images of each training set held out (the same split for every variant)."""
    from dsclora.data import list_images

    held = out / "data" / "held_out"
    train_dirs = []
    for name in TRAIN_SETS:
        images = list_images(SHARED / "data" / name)
        train = out / "data" / name
        for folder, files in ((held, images[:HELD_OUT_PER_SET]), (train, images[HELD_OUT_PER_SET:])):
            folder.mkdir(parents=True, exist_ok=True)
            for src in files:
                link = folder / src.name
                if not link.exists():
                    link.symlink_to(src.resolve())
        train_dirs.append(str(train))
    return train_dirs, [str(held)]


def evaluate(checkpoint) -> dict[str, float]:
    """{test set: mean PSNR (Y)} of a checkpoint (path or state dict) on the plain PyTorch path."""
    from dsclora.evaluation import evaluate_folder
    from dsclora.models import load_model

    model = load_model(checkpoint).eval()
    return {name: evaluate_folder(model, SHARED / "data" / name)["psnr"] for name in TEST_SETS}


def run_variant(name: str, overrides: list[str], args, data: tuple[list[str], list[str]], base: dict) -> dict:
    """Train one variant; its last and exported models' PSNR per test set (``base``: the base's)."""
    from dsclora.train import Trainer
    from dsclora.train.config import load_config

    run_dir = args.out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = [f"stages=[{{iterations = {args.iterations}, patch_size = {args.patch}, "
              f"batch_size = {args.batch}, lr = 1e-4}}]"]
    settings = [f'run_dir="{run_dir}"', f'model.base="{SHARED / "weights" / BASE}"',
            f'model.teacher="{SHARED / "weights" / TEACHER}"', f"data.hr={json.dumps(data[0])}",
            f"validation.hr={json.dumps(data[1])}", f"validation.every={args.validate_every}",
            f"data.workers={args.workers}", f"seed={args.seed}", "progress=false",
            f"log_every={args.validate_every // 2}", f"checkpoint_every={args.iterations}"]
    config = load_config(None, settings + budget + overrides)
    start = time.perf_counter()
    result = Trainer(config).run()
    seconds = time.perf_counter() - start
    selected = json.loads((run_dir / "checkpoints" / "best.json").read_text())["iteration"]
    last = evaluate(result.exported["dsclora_x4_last.pth"])
    export = {0: base, args.iterations: last}.get(selected) or evaluate(result.exported["dsclora_x4.pth"])
    return {"variant": name, "overrides": overrides, "budget": budget[0], "train_seconds": seconds,
            "selected_iteration": selected, "last": last, "export": export}


def blended(run_dir: Path, beta: float) -> dict:
    """The eval-form state dict β·W_last + (1 − β)·W_base: the trainer's ``model.beta`` applied
    after the fact (only the adapted weights differ between the two)."""
    from dsclora.models import load_model

    last = load_model(run_dir / "dsclora_x4_last.pth").state_dict()
    base = load_model(SHARED / "weights" / BASE).state_dict()
    return {k: beta * last[k] + (1 - beta) * base[k] for k in base}


def table(rows: list[dict], base: dict[str, float], header: str) -> str:
    """Markdown: PSNR deltas (dB) vs the base for each variant's last and exported model (and
    the last one blended with the base, β < 1)."""
    sets = " | ".join(TEST_SETS)
    lines = [header, "", f"base PSNR (Y): " + ", ".join(f"{s} {base[s]:.4f}" for s in TEST_SETS), "",
             f"| variant | overrides | model | {sets} | mean | train s |",
             "|---|---|---|" + "---|" * len(TEST_SETS) + "---|---|"]
    for row in rows:
        models = {"last": row["last"], f"export (it {row['selected_iteration']})": row["export"],
                  **{f"last, β = {beta}": psnr for beta, psnr in sorted(row.get("beta", {}).items())}}
        for label, psnr in models.items():
            deltas = [psnr[s] - base[s] for s in TEST_SETS]
            cells = " | ".join(f"{d:+.4f}" for d in deltas)
            lines.append(f"| {row['variant']} | {' '.join(row['overrides']) or '-'} | {label} | {cells} | "
                         f"{sum(deltas) / len(deltas):+.4f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--iterations", type=int, default=300, help="iterations per variant (the budget)")
    parser.add_argument("--patch", type=int, default=128, help="HR patch side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--table", type=Path, default=None, help="write the Markdown table here too")
    parser.add_argument("--force", action="store_true", help="rerun variants that have results")
    parser.add_argument("--betas", default="", help="also evaluate the last model blended with the base at "
                        "these β (comma-separated; no retraining)")
    args = parser.parse_args(argv)
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name:18s} {' '.join(overrides) or '(trainer defaults)'}")
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; see --list")
    args.out.mkdir(parents=True, exist_ok=True)
    base_file = args.out / "base.json"
    if not base_file.exists():
        base_file.write_text(json.dumps(evaluate(SHARED / "weights" / BASE)))
    base = json.loads(base_file.read_text())
    data = split_training_images(args.out)
    rows = []
    for name in names:
        done = args.out / f"{name}.json"
        if args.force or not done.exists():
            row = run_variant(name, VARIANTS[name], args, data, base)
            done.write_text(json.dumps(row, indent=1))
        row = json.loads(done.read_text())
        for beta in [b for b in args.betas.split(",") if b and b not in row.setdefault("beta", {})]:
            row["beta"][beta] = evaluate(blended(args.out / name, float(beta)))
            done.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(table(rows[-1:], base, f"## {name}"), flush=True)
    header = (f"## Fine-tuning study: {args.iterations} iterations x batch {args.batch} x {args.patch}px HR, "
              f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    text = table(rows, base, header)
    print(text)
    if args.table:
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
