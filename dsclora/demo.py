"""``dsclora demo``: the whole DSCLoRA pipeline in a few CPU minutes, offline.

1. data: built-in procedurally generated images (``dsclora.sample_data``), or ``--data DIR``
   split into training and held-out images;
2. a base SPAN and a wider teacher, briefly pretrained with plain L1 (or ``--base``/``--teacher``);
3. a short two-stage DSCLoRA fine-tune with the real trainer (``dsclora.train``); stage two uses
   patches on which the naive affinity loss would need far more memory than the fused op;
4. merge, export, fused inference (``dsclora.infer``);
5. a table (bicubic / base / teacher / DSCLoRA PSNR, SSIM, time) on held-out images, SR outputs,
   side-by-side crops and loss curves in the output folder.
The default numbers are demonstrations of the machinery on tiny models and toy data, not results.
"""
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


STANDARD_IMG_RANGE = 255.0

DISCLAIMER = ("These are demonstration numbers: small models or data and seconds of training. "
              "They show that the pipeline works, not what DSCLoRA achieves.")


@dataclass
class PretrainSettings:
    channels: int
    iterations: int
    patch_size: int = 128    # HR
    batch_size: int = 2
    lr: float = 3e-4


@dataclass
class Recipe:
    """The fine-tune: ``stages`` of (iterations, HR patch, batch, lr, schedule), loss settings
    (``dsclora.train.config.LossConfig`` fields), the export's β and the validation interval."""

    stages: list[tuple[int, int, int, float, str]]
    loss: dict = field(default_factory=dict)
    beta: float = 1.0
    validate_every: int = 50


#: Built-in toy models and images: seconds of training with the paper's loss weights.
TOY_RECIPE = Recipe(stages=[(100, 128, 2, 2e-4, "constant"), (12, 192, 2, 2e-4, "constant")])
#: Real SPAN checkpoints (``--base``/``--teacher``) on a CPU budget, as the fine-tuning study chose it
#: (bench/study_finetune.py, bench/STUDY.md): the teacher's output as the only pixel target (the
#: small training sets' JPEG-born HR images pull the student away from the benchmarks), a light
#: affinity term, lr 1e-5, and the merged weights averaged with the base (β = 0.5).
REAL_RECIPE = Recipe(stages=[(2000, 128, 8, 1e-5, "constant"), (100, 192, 8, 1e-5, "constant")],
                     loss={"rec": 0.0, "ts": 1.0, "ad": 0.001}, beta=0.5, validate_every=500)


@dataclass
class DemoSettings:
    out: Path = Path("dsclora_demo")
    base: str | None = None          # SPAN checkpoint; None: pretrain one on the data
    teacher: str | None = None       # SPAN checkpoint; None: pretrain a wider one
    data: list[str] | None = None    # folders of HR images; None: built-in sample images
    benchmarks: list[str] = field(default_factory=list)  # HR folders evaluated at the end (bicubic LR)
    recipe: Recipe | None = None     # None: REAL_RECIPE with --base/--teacher, else TOY_RECIPE
    scale: int = 4
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    train_images: int = 32
    held_out_images: int = 8
    image_size: int = 192
    base_pretrain: PretrainSettings = field(default_factory=lambda: PretrainSettings(12, 250))
    teacher_pretrain: PretrainSettings = field(default_factory=lambda: PretrainSettings(24, 400))

    @property
    def finetune(self) -> Recipe:
        if self.recipe is not None:
            return self.recipe
        return REAL_RECIPE if self.base is not None else TOY_RECIPE


@dataclass
class DemoResult:
    out: Path
    table: str
    results: dict
    seconds: float
    files: dict[str, Path]


def _say(message: str = "") -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- data
def prepare_data(settings: DemoSettings) -> tuple[Path, Path]:
    """(training folder, held-out folder) under ``out/data``."""
    from dsclora.data import list_images
    from dsclora.sample_data import write_sample_images

    train_dir, held_dir = settings.out / "data" / "train", settings.out / "data" / "held_out"
    if settings.data is None:
        size = settings.image_size
        write_sample_images(train_dir, settings.train_images, settings.seed, size, size)
        write_sample_images(held_dir, settings.held_out_images, settings.seed + 100_000, size, size)
        _say(f"data: {settings.train_images} training + {settings.held_out_images} held-out built-in sample "
             f"images ({size}x{size}) in {settings.out / 'data'}")
        return train_dir, held_dir
    images = [image for folder in settings.data for image in list_images(folder)]
    if len(images) < 2:
        raise ValueError(f"{', '.join(settings.data)}: the demo needs at least 2 images (training + held-out)")
    held = images[:: max(2, len(images) // max(1, settings.held_out_images))][: settings.held_out_images]
    for folder, files in ((train_dir, [p for p in images if p not in held]), (held_dir, held)):
        folder.mkdir(parents=True, exist_ok=True)
        for src in files:
            link = folder / src.name
            if not link.exists():
                os.symlink(src.resolve(), link)
    _say(f"data: {len(images) - len(held)} training + {len(held)} held-out images from {', '.join(settings.data)} "
         f"(linked in {settings.out / 'data'})")
    return train_dir, held_dir


# ---------------------------------------------------------------- pretraining
def bicubic_taps(scale: int) -> np.ndarray:
    """(scale, 3) weights: MATLAB bicubic upscaling restricted to the 3 nearest LR pixels.

    Row a gives HR sub-pixel a of an LR pixel from LR offsets (-1, 0, +1), renormalised to sum 1
    (the cubic kernel's small taps at ±2 are dropped).
    """
    from dsclora.data.imresize import resize_matrix

    centre = 3
    rows = resize_matrix(2 * centre + 1, scale)[centre * scale:(centre + 1) * scale, centre - 1:centre + 2]
    return rows / rows.sum(axis=1, keepdims=True)


def fit_linear_upsampler(pairs, scale: int, mean) -> np.ndarray:
    """(scale², 3, 3) least-squares kernels: the best linear 3x3-support x``scale`` upsampler
    (same kernel for each colour, applied to the image minus ``mean``) for benchmark ``pairs``."""
    mean = np.asarray(mean, dtype=np.float64)
    inputs, targets = [], []
    for pair in pairs:
        lr, hr = pair.lr / 255 - mean, pair.hr / 255 - mean
        h, w = lr.shape[:2]
        windows = [lr[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        inputs.append(np.stack(windows, axis=-1).reshape(-1, 9))  # rows: (LR pixel, colour)
        blocks = hr[scale:(h - 1) * scale, scale:(w - 1) * scale].reshape(h - 2, scale, w - 2, scale, -1)
        targets.append(blocks.transpose(0, 2, 4, 1, 3).reshape(-1, scale * scale))
    taps, *_ = np.linalg.lstsq(np.concatenate(inputs), np.concatenate(targets), rcond=None)
    return taps.T.reshape(scale * scale, 3, 3)


@torch.no_grad()
def interpolation_init(model, kernels: np.ndarray | None = None) -> None:
    """Make an eval-form SPAN start as (3-tap) bicubic upscaling, so that a few hundred CPU
    iterations train a residual on top of it instead of learning interpolation from scratch.

    conv_1 passes the input (minus the mean) to its first channels, conv_cat routes them to its
    first channels and upsampler.0 applies the bicubic sub-pixel weights; the upsampler's other
    inputs start at 0, the rest of the network keeps its random init. conv_1's random filters
    produce features of the size a standard SPAN (x255 input) has at init whatever ``img_range``:
    SPAB's gate (sigmoid(o3) − 0.5) · (o3 + x) needs them large, or the blocks' outputs vanish.
    """
    s, c_in = model.upscale, model.in_channels
    conv_1, up = model.conv_1.eval_conv, model.upsampler[0]
    conv_1.weight *= STANDARD_IMG_RANGE / model.img_range  # features at the scale SPAB expects
    conv_1.weight[:c_in] = 0
    conv_1.bias[:c_in] = 0
    model.conv_cat.weight[:c_in] = 0
    model.conv_cat.bias[:c_in] = 0
    for c in range(c_in):
        conv_1.weight[c, c, 1, 1] = 1 / model.img_range
        model.conv_cat.weight[c, c] = 1
    if kernels is None:
        taps = bicubic_taps(s)
        kernels = np.einsum("ay,bx->abyx", taps, taps).reshape(s * s, 3, 3)
    kernels = torch.from_numpy(kernels).to(up.weight.dtype)
    up.weight.zero_()
    for c in range(c_in):  # PixelShuffle: channel c·s² + a·s + b -> colour c, sub-pixel (a, b)
        up.weight[c * s * s:(c + 1) * s * s, c] = kernels
    up.bias.copy_(model.mean.flatten().repeat_interleave(s * s))


@torch.no_grad()
def with_img_range(model, img_range: float = STANDARD_IMG_RANGE):
    """An equal eval-form SPAN whose input scaling is ``img_range`` (conv_1's weight rescaled).

    SPAN multiplies its input by 255; with Adam's scale-free steps that makes conv_1 move 255x
    too fast in short from-scratch training, so the demo pretrains with img_range = 1 and
    converts to the standard layout afterwards (exact: conv_1 is linear in its input).
    """
    from dsclora.models import SPAN

    out = SPAN(model.feature_channels, model.cat_channels, model.upscale, model.in_channels,
               model.out_channels, img_range=img_range, rgb_mean=tuple(model.mean.flatten().tolist()),
               form="eval")
    state = model.state_dict()
    state["conv_1.eval_conv.weight"] = state["conv_1.eval_conv.weight"] * (model.img_range / img_range)
    out.load_state_dict(state)
    return out.eval()


def pretrain_span(p: PretrainSettings, train_dir: Path, scale: int, seed: int, device: torch.device,
                  workers: int, kernels: np.ndarray | None = None) -> tuple["torch.nn.Module", list[float]]:
    """A standard SPAN(p.channels) trained with L1 (Adam, cosine schedule) from an interpolation
    start (``kernels``, see ``interpolation_init``); returns (model, losses)."""
    from torch.utils.data import DataLoader

    from dsclora.models import SPAN
    from dsclora.train.data import IterationSampler, PatchDataset, find_images

    torch.manual_seed(seed)
    model = SPAN(p.channels, upscale=scale, img_range=1.0, form="eval")  # plain 3x3 convs: fastest
    interpolation_init(model, kernels)
    model.to(device).train()
    dataset = PatchDataset(find_images([str(train_dir)], [], scale), scale, p.patch_size, seed)
    loader = DataLoader(dataset, batch_size=p.batch_size, num_workers=workers,
                        sampler=IterationSampler(0, p.iterations, p.batch_size))
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, p.iterations)
    losses = []
    for lr, hr in loader:
        loss = torch.nn.functional.l1_loss(model(lr.to(device)), hr.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return with_img_range(model.cpu()), losses


def prepare_models(settings: DemoSettings, train_dir: Path, device: torch.device) -> tuple[Path, Path, dict]:
    """(base checkpoint, teacher checkpoint, pretraining loss curves)."""
    from dsclora.evaluation import load_pairs
    from dsclora.export import export
    from dsclora.models.span import DEFAULT_RGB_MEAN

    curves, paths, kernels = {}, {}, None
    for role, given, p, seed in (("base", settings.base, settings.base_pretrain, settings.seed),
                                 ("teacher", settings.teacher, settings.teacher_pretrain, settings.seed + 1)):
        if given is not None:
            paths[role] = Path(given)
            _say(f"{role}: {given}")
            continue
        start = time.perf_counter()
        if kernels is None:
            kernels = fit_linear_upsampler(load_pairs(train_dir, None, settings.scale), settings.scale,
                                           DEFAULT_RGB_MEAN)
        model, losses = pretrain_span(p, train_dir, settings.scale, seed, device, settings.workers, kernels)
        paths[role] = export(model.cpu(), "official", settings.out / "models" / f"{role}_x{settings.scale}.pth")
        curves[f"{role} pretrain L1"] = (list(range(1, len(losses) + 1)), losses)
        _say(f"{role}: SPAN C={p.channels} x{settings.scale} pretrained from a linear start with L1 for "
             f"{p.iterations} iterations ({time.perf_counter() - start:.0f} s) -> {paths[role]}")
    return paths["base"], paths["teacher"], curves


# ---------------------------------------------------------------- fine-tune
def affinity_memory(batch: int, lr_patch: int, channels: tuple[int, int], layers: int = 6) -> tuple[int, int]:
    """Bytes of float32 affinity state per step: naive (A_S and A_T, B·N² each, per layer, kept for
    backward) vs fused (normalised features and their gradients, B·C·N each, per layer)."""
    n = lr_patch * lr_patch
    naive = layers * 2 * batch * n * n * 4
    fused = layers * 2 * batch * sum(channels) * n * 4
    return naive, fused


def finetune_config(settings: DemoSettings, base: Path, teacher: Path, train_dir: Path, held_dir: Path):
    """The trainer configuration of the fine-tune: ``settings.finetune``, validated on the held-out
    images (so the export is never worse there than the base)."""
    from dsclora.train.config import LossConfig, StageConfig, TrainConfig, validate

    recipe = settings.finetune
    config = TrainConfig(run_dir=str(settings.out / "run"), seed=settings.seed, device=settings.device,
                         log_every=10, checkpoint_every=10_000, progress=True)
    config.model.base, config.model.teacher = str(base), str(teacher)
    config.data.hr, config.data.workers = [str(train_dir)], settings.workers
    config.stages = [StageConfig(*stage) for stage in recipe.stages]
    config.loss = LossConfig(**recipe.loss)
    config.model.beta = recipe.beta
    config.validation.hr, config.validation.every = [str(held_dir)], recipe.validate_every
    validate(config, "demo configuration")
    return config


def finetune(settings: DemoSettings, base: Path, teacher: Path, train_dir: Path, held_dir: Path):
    from dsclora.models import load_model
    from dsclora.models.span import DSCF_FEATURE_BLOCKS
    from dsclora.train import Trainer

    config = finetune_config(settings, base, teacher, train_dir, held_dir)
    if Path(config.run_dir).exists():  # a previous demo's run: start over
        shutil.rmtree(config.run_dir)
    last = config.stages[-1]
    lr_patch = last.patch_size // settings.scale
    widths = (load_model(base).feature_channels, load_model(teacher).feature_channels)
    layers = 3 * DSCF_FEATURE_BLOCKS if config.loss.features == "dscf" else 6
    naive, fused = affinity_memory(last.batch_size, lr_patch, widths, layers)
    loss = config.loss
    _say(f"fine-tune: " + ", ".join(f"stage {i + 1} {s.iterations} it on {s.patch_size}px HR patches (batch "
                                    f"{s.batch_size}, lr {s.lr:g})" for i, s in enumerate(config.stages))
         + f"; loss {loss.rec:g}·rec + {loss.ts:g}·ts + {loss.ad:g}·affinity({loss.features})")
    _say(f"  affinity loss memory at the last stage (N = {lr_patch}x{lr_patch} = {lr_patch ** 2} LR pixels, batch "
         f"{last.batch_size}, {layers} maps): naive {naive / 2**30:.2f} GiB for the N x N matrices vs about "
         f"{fused / 2**20:.1f} MiB fused ({naive / fused:.0f}x less)")
    start = time.perf_counter()
    result = Trainer(config).run()
    _say(f"  {result.iterations} iterations in {time.perf_counter() - start:.0f} s; "
         f"config: {settings.out / 'run' / 'config.toml'} (rerun with `dsclora train --config ...`)")
    return result


# ---------------------------------------------------------------- evaluation and outputs
def _side_by_side(crops: list[np.ndarray], labels: list[str], zoom: int = 2):
    from PIL import Image, ImageDraw

    tiles = []
    for crop, label in zip(crops, labels):
        tile = Image.fromarray((np.clip(crop, 0, 1) * 255).round().astype(np.uint8))
        tile = tile.resize((tile.width * zoom, tile.height * zoom), Image.NEAREST)
        canvas = Image.new("RGB", (tile.width, tile.height + 16), "white")
        canvas.paste(tile, (0, 16))
        ImageDraw.Draw(canvas).text((3, 2), label, fill="black")
        tiles.append(canvas)
    sheet = Image.new("RGB", (sum(t.width + 4 for t in tiles), tiles[0].height), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    return np.asarray(sheet).astype(np.float32) / 255


def write_outputs(models: dict, held_dir: Path, out: Path, scale: int) -> dict[str, Path]:
    """SR images of the DSCLoRA model and side-by-side crops (HR | bicubic | base | DSCLoRA)."""
    from dsclora.data import save_image
    from dsclora.evaluation import load_pairs

    files = {}
    for pair in load_pairs(held_dir, None, scale):
        lr = torch.from_numpy(pair.lr / 255).float().permute(2, 0, 1)[None]
        srs = {}
        with torch.inference_mode():
            for name, model in models.items():
                srs[name] = model(lr).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        stem = Path(pair.name).stem
        save_image(out / "outputs" / f"{stem}_dsclora.png", srs["DSCLoRA"])
        h, w = pair.hr.shape[:2]
        size = min(96, h, w)
        top, left = (h - size) // 2, (w - size) // 2
        window = (slice(top, top + size), slice(left, left + size))
        crops = [pair.hr[window] / 255] + [srs[name][window] for name in models]
        sheet = _side_by_side(crops, ["HR"] + list(models))
        files[stem] = out / "comparisons" / f"{stem}.png"
        save_image(files[stem], sheet)
    return files


def evaluate(settings: DemoSettings, base: Path, teacher: Path, exported: Path, held_dir: Path, device):
    """PSNR/SSIM/time of bicubic, base, teacher and DSCLoRA (fused inference) on the held-out images
    and the benchmark folders: (models, results {model: {set: ...}}, held-out count)."""
    from dsclora import infer
    from dsclora.evaluation import load_pairs
    from dsclora.train.report import bicubic_upscaler, evaluate_models, validation_sets

    models = {"bicubic": bicubic_upscaler(settings.scale),
              "base": infer.load(base, device=device, dtype=torch.float32),
              "teacher": infer.load(teacher, device=device, dtype=torch.float32),
              "DSCLoRA": infer.load(exported, device=device, dtype=torch.float32)}
    pairs = {"held-out": load_pairs(held_dir, None, settings.scale),
             **validation_sets(settings.benchmarks, settings.scale)}
    held_out = {"held-out": pairs.pop("held-out")}
    evaluate_models(models, {"held-out": held_out["held-out"][:1]}, settings.scale, settings.scale, "y",
                    device)  # first calls pay one-time costs: not timed
    timed = {name: TimedModel(model, device) for name, model in models.items()}
    results = evaluate_models(timed, held_out, settings.scale, settings.scale, "y", device)
    for name, model in timed.items():  # the ms column: the forwards, not the metrics around them
        results[name]["held-out"]["seconds"] = model.seconds
    for name, per_set in evaluate_models(models, pairs, settings.scale, settings.scale, "y", device).items():
        results[name].update(per_set)
    return models, results, len(held_out["held-out"])


class TimedModel:
    """``model`` whose calls' wall time, synchronised on a GPU, adds up in ``seconds``: the network
    forward alone (on a GPU the metrics and image conversions around it are CPU work)."""

    def __init__(self, model, device):
        self.model, self.seconds = model, 0.0
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        self._synchronize()
        start = time.perf_counter()
        sr = self.model(lr)
        self._synchronize()
        self.seconds += time.perf_counter() - start
        return sr

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def benchmark_table(results: dict) -> str:
    """PSNR / SSIM (Y) per benchmark set and model, and the DSCLoRA − base PSNR change."""
    from dsclora.train.report import markdown_table

    sets = [name for name in next(iter(results.values())) if name != "held-out"]
    table = markdown_table({m: {s: per_set[s] for s in sets} for m, per_set in results.items()},
                           "Benchmarks (PSNR dB / SSIM on Y, border = scale)")
    deltas = [results["DSCLoRA"][s]["psnr"] - results["base"][s]["psnr"] for s in sets]
    return table + "| DSCLoRA − base (dB) | " + " | ".join(f"{d:+.4f}" for d in deltas) + " |\n"


def results_table(results: dict, count: int, params: dict[str, int]) -> str:
    lines = [f"| model | params | PSNR (Y) dB | SSIM (Y) | ms / image ({count} held-out images) |",
             "|---|---|---|---|---|"]
    for name, per_set in results.items():
        r = per_set["held-out"]
        size = f"{params[name]:,}" if name in params else "-"
        lines.append(f"| {name} | {size} | {r['psnr']:.3f} | {r['ssim']:.4f} | {1000 * r['seconds'] / count:.1f} |")
    return "\n".join(lines) + "\n"


def run_demo(settings: DemoSettings) -> DemoResult:
    """The whole pipeline; writes everything under ``settings.out``."""
    from dsclora.models import load_model
    from dsclora.train.distributed import resolve_device
    from dsclora.train.plot import plot_curves

    start = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    _say(f"dsclora demo -> {settings.out} (device {device}, {torch.get_num_threads()} CPU threads)")
    note = DISCLAIMER if settings.data is None or settings.base is None else ""
    _say(note or "Running on the given weights and data.")
    train_dir, held_dir = prepare_data(settings)
    base, teacher, curves = prepare_models(settings, train_dir, device)
    finetune(settings, base, teacher, train_dir, held_dir)
    exported = settings.out / "run" / f"dsclora_x{settings.scale}.pth"
    models, results, count = evaluate(settings, base, teacher, exported, held_dir, device)
    params = {name: sum(p.numel() for p in load_model(path).parameters())
              for name, path in (("base", base), ("teacher", teacher), ("DSCLoRA", exported))}
    files = {"comparisons": settings.out / "comparisons", "outputs": settings.out / "outputs",
             "fine-tune loss": settings.out / "run" / "loss_curve.png", "model": exported}
    write_outputs({k: models[k] for k in ("bicubic", "base", "DSCLoRA")}, held_dir, settings.out, settings.scale)
    if curves:
        files["pretrain loss"] = plot_curves(curves, settings.out / "pretrain_loss.png", title="Pretraining L1 loss")
    table = results_table(results, count, params)
    if settings.benchmarks:
        table += "\n" + benchmark_table(results)
    seconds = time.perf_counter() - start
    summary = (f"# dsclora demo\n\n{table}\nDSCLoRA = base + ConvLoRA fine-tuned with distillation from "
               f"the teacher, merged: same size and speed as the base.\nTotal time {seconds:.0f} s.\n\n"
               f"{note}\n\n"
               + "".join(f"- {k}: {v}\n" for k, v in files.items()))
    (settings.out / "README.md").write_text(summary)
    _say("\n" + table)
    for key, path in files.items():
        _say(f"{key}: {path}")
    _say(f"total {seconds:.0f} s. {note}")
    return DemoResult(settings.out, table, results, seconds, files)
