"""The training configuration: a dataclass tree read from TOML (or YAML), with overrides.

Schema and defaults (SPEC §5) are the dataclasses below; the README's "Train" section documents
every key. ``load_config(path, overrides)`` validates as it builds, and every error names the key.
``to_toml(config)`` writes the resolved configuration back (saved in the run folder).
"""
import contextlib
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dsclora.lora import PAPER_RANKS, TARGET_LAYERS
from dsclora.models.span import FEATURE_SETS

#: Learning-rate schedules within a stage: constant, or cosine decay from the stage's lr to 0.
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    base: str = ""                      # SPAN checkpoint to fine-tune (required)
    teacher: str = ""                   # SPAN checkpoint of the teacher ("" only if loss.ts = loss.ad = 0)
    ranks: dict[str, int] = field(default_factory=lambda: dict(PAPER_RANKS))
    targets: list[str] = field(default_factory=lambda: list(TARGET_LAYERS))
    alpha_per_rank: float = 2.0         # α = alpha_per_rank · r
    beta: float = 1.0                   # export W = β·W_merged + (1 − β)·W_base
    fused_blocks: bool = True           # fused SPAB op for student and teacher when available


@dataclass
class DataConfig:
    hr: list[str] = field(default_factory=list)  # HR image folders (required)
    lr: list[str] = field(default_factory=list)  # paired LR folders, one per HR folder; [] = bicubic on the fly
    workers: int = 2                    # DataLoader worker processes (0 = load in the main process)
    augment: bool = True                # random flips and 90° rotations
    quantize_lr: bool = True            # round on-the-fly LR to 8-bit values, like LR files
    cache_images: bool = False          # keep decoded images in memory (per worker process)


@dataclass
class StageConfig:
    iterations: int = 50_000
    patch_size: int = 256               # HR patch side; the LR patch is patch_size / scale
    batch_size: int = 8                 # global batch (split over the processes of a distributed run)
    lr: float = 1e-4
    schedule: str = "constant"          # "constant" or "cosine" (decay from lr to 0 over the stage)

    def lr_at(self, step: int) -> float:
        """The learning rate of the stage's ``step``-th iteration (0-based)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.iterations))
        return self.lr


@dataclass
class LossConfig:
    rec: float = 1.0                    # λ_rec: reconstruction against HR
    ts: float = 0.1                     # λ_ts: L1 to the teacher's output
    ad: float = 0.01                    # λ_ad: spatial affinity of the feature maps below
    reconstruction: str = "l1"          # "l1" or "l2"
    features: str = "blocks"            # distilled maps: "blocks" (F1..F6) or "dscf" (convs of blocks 1-3)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term against the teacher (ts or ad) has a weight."""
        return self.ts > 0 or self.ad > 0


@dataclass
class OptimConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam
    weight_decay: float = 0.0
    ema_decay: float = 0.999            # EMA of the adapters, used for validation and export
    grad_clip: float = 0.0              # max gradient norm; 0 = off


@dataclass
class ValidationConfig:
    hr: list[str] = field(default_factory=list)  # HR folders evaluated with bicubic LR; [] = no validation
    every: int = 5000                   # iterations between validations (and at the end)
    border: int = -1                    # pixels cropped per side; -1 = the scale
    channel: str = "y"                  # "y" or "rgb"


@dataclass
class TrainConfig:
    run_dir: str = "runs/dsclora"       # logs, checkpoints, exported model
    seed: int = 0
    device: str = "auto"                # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: str = "none"                   # "none" or "bf16" (autocast)
    deterministic: bool = False         # torch.use_deterministic_algorithms
    log_every: int = 100
    checkpoint_every: int = 1000
    max_nonfinite: int = 5              # abort after this many non-finite steps in a row
    progress: bool = True               # tqdm progress bar
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(), StageConfig(patch_size=512)])
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    @property
    def total_iterations(self) -> int:
        return sum(s.iterations for s in self.stages)

    def stage_at(self, iteration: int) -> tuple[int, StageConfig]:
        """(index, stage) that runs iteration ``iteration`` (0-based)."""
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.iterations
            if iteration < end:
                return index, stage
        raise IndexError(f"iteration {iteration} is past the last stage ({end} iterations)")


# ---------------------------------------------------------------- reading
def read_config_file(path: str | Path) -> dict:
    """The raw mapping in a ``.toml`` or ``.yaml``/``.yml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path}: YAML configuration needs pyyaml (pip install pyyaml) or use TOML") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        return data
    raise ConfigError(f"{path}: unknown configuration format {path.suffix!r} (use .toml, .yaml or .yml)")


def parse_override(text: str) -> tuple[list[str], object]:
    """``"stages.0.patch_size=64"`` -> (["stages", "0", "patch_size"], 64); values are TOML values
    (numbers, true/false, "strings", [lists]); anything else is taken as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. stages.0.iterations=100")
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().replace("[", ".").replace("]", "").split("."), value


def apply_override(data: dict, keys: list[str], value, text: str) -> None:
    """Set ``data[k0][k1]...`` (list indices as numbers; index == length appends a table)."""
    node = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) > len(node):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:depth])} has {len(node)} entries, "
                                  f"index {key!r} is not one of them (or the next)")
            if int(key) == len(node):
                node.append({})
            key = int(key)
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:depth + 1])} is not a table")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A validated TrainConfig from ``path`` (or the defaults) and ``key=value`` overrides."""
    data = read_config_file(path) if path is not None else {}
    source = str(path) if path is not None else "configuration"
    if "stages" in data and isinstance(data["stages"], list):
        data["stages"] = [dict(s) if isinstance(s, dict) else s for s in data["stages"]]
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "stages" and "stages" not in data:  # overriding a default stage
            data["stages"] = [dataclasses.asdict(s) for s in TrainConfig().stages]
        apply_override(data, keys, value, text)
    config = from_dict(TrainConfig, data, source, prefix="")
    validate(config, source)
    return config


def from_dict(cls, data, source: str, prefix: str):
    """Build dataclass ``cls`` from a mapping, checking key names and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the top level'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix + unknown[0]!r} (keys here: {', '.join(names)})")
    values = {name: _convert(hints[name], data[name], source, prefix + name) for name in names if name in data}
    return cls(**values)


def _convert(hint, value, source: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return [_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a table, got {value!r}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported configuration type {hint} for {key}")  # a bug in the schema


def validate(config: TrainConfig, source: str = "configuration") -> None:
    """Value checks that the types cannot express; each error names its key."""
    def check(ok: bool, key: str, message: str):
        if not ok:
            raise ConfigError(f"{source}: {key}: {message}")

    check(bool(config.model.base), "model.base", "the SPAN checkpoint to fine-tune is required")
    check(bool(config.data.hr), "data.hr", "at least one folder of HR training images is required")
    check(not config.data.lr or len(config.data.lr) == len(config.data.hr), "data.lr",
          f"give one LR folder per HR folder ({len(config.data.hr)}) or none")
    check(config.data.workers >= 0, "data.workers", "must be >= 0")
    check(len(config.stages) > 0, "stages", "at least one stage is required")
    for i, stage in enumerate(config.stages):
        check(stage.iterations > 0, f"stages[{i}].iterations", "must be > 0")
        check(stage.patch_size > 0, f"stages[{i}].patch_size", "must be > 0")
        check(stage.batch_size > 0, f"stages[{i}].batch_size", "must be > 0")
        check(stage.lr > 0, f"stages[{i}].lr", "must be > 0")
        check(stage.schedule in SCHEDULES, f"stages[{i}].schedule", f"must be one of {SCHEDULES}")
    for name in ("rec", "ts", "ad"):
        check(getattr(config.loss, name) >= 0, f"loss.{name}", "must be >= 0")
    check(config.loss.rec + config.loss.ts + config.loss.ad > 0, "loss", "all weights are 0")
    check(config.loss.reconstruction in ("l1", "l2"), "loss.reconstruction", "must be 'l1' or 'l2'")
    check(config.loss.features in FEATURE_SETS, "loss.features", f"must be one of {FEATURE_SETS}")
    check(bool(config.model.teacher) or not config.loss.needs_teacher, "model.teacher",
          "a teacher checkpoint is required when loss.ts or loss.ad is > 0")
    check(all(r > 0 for r in config.model.ranks.values()), "model.ranks", "ranks must be > 0")
    check(len(config.model.targets) > 0, "model.targets", "at least one target layer is required")
    check(0 <= config.model.beta <= 1, "model.beta", "must be in [0, 1]")
    check(len(config.optim.betas) == 2 and all(0 <= b < 1 for b in config.optim.betas),
          "optim.betas", "two numbers in [0, 1) are required")
    check(0 <= config.optim.ema_decay < 1, "optim.ema_decay", "must be in [0, 1)")
    check(config.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    check(config.amp in ("none", "bf16"), "amp", "must be 'none' or 'bf16'")
    check(config.log_every > 0, "log_every", "must be > 0")
    check(config.checkpoint_every > 0, "checkpoint_every", "must be > 0")
    check(config.max_nonfinite > 0, "max_nonfinite", "must be > 0")
    check(config.validation.every > 0, "validation.every", "must be > 0")
    check(config.validation.channel in ("y", "rgb"), "validation.channel", "must be 'y' or 'rgb'")


def check_stages(config: TrainConfig, scale: int, world_size: int) -> None:
    """The checks of the stages that need the model's ``scale`` and the number of processes."""
    for i, stage in enumerate(config.stages):
        if stage.patch_size % scale:
            raise ConfigError(f"stages[{i}].patch_size: {stage.patch_size} is not a multiple of the scale {scale}")
        if stage.batch_size % world_size:
            raise ConfigError(f"stages[{i}].batch_size: {stage.batch_size} is not divisible by "
                              f"the {world_size} processes")


@contextlib.contextmanager
def config_errors(key: str):
    """Re-raise a bad file/folder/table error from inside the block as a ConfigError naming ``key``."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConfigError(f"{key}: {message}") from exc


# ---------------------------------------------------------------- writing
def to_toml(config: TrainConfig) -> str:
    """The configuration as TOML text that ``load_config`` reads back to an equal TrainConfig."""
    top, tables, stages = [], [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "stages":
            for stage in value:
                stages.append("\n[[stages]]\n" + _toml_table(stage))
        elif dataclasses.is_dataclass(value):
            tables.append(f"\n[{f.name}]\n" + _toml_table(value))
        else:
            top.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(top) + "\n" + "".join(tables) + "".join(stages)


def _toml_table(obj) -> str:
    return "".join(f"{f.name} = {_toml_value(getattr(obj, f.name))}\n" for f in dataclasses.fields(obj))


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (bool, int, float, str)):
        return json.dumps(value)  # JSON scalars are valid TOML (true/false, numbers, "strings")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
