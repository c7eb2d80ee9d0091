"""Typed run configuration: nested dataclasses, mirrored section for section by YAML.

Precedence: ``--set section.key=value`` > YAML file > the defaults below.
Unknown keys, wrong types and duplicate YAML keys fail with ``ConfigError`` naming the
file and the key (the CLI turns it into exit code 2; the strict reading is
bt_fast/yamlconf.py). The resolved config is written to
``RUN_DIR/config.yaml`` and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml

from bt_fast import gradcomm, safeio
from bt_fast.errors import ConfigError
from bt_fast.specs import parse_readout, parse_stop_at
from bt_fast.methods import METHODS
from bt_fast.pipelines import bounds, presets
from bt_fast.pipelines.bounds import bounded
from bt_fast.pipelines.spec import MAX_SIDE, ViewSpec, expand
from bt_fast.yamlconf import apply_overrides, build, parse_override, read_yaml, yaml_value


@dataclass
class DataConfig:
    train_dir: str = ""
    """ImageFolder root of the pretraining images (``class/xxx.jpg``); required with
    reader = folder (no default dataset: configs/fmnist.yaml names Fashion-MNIST's)."""
    val_dir: str = ""
    """ImageFolder root of the held-out images (evaluation)."""
    image_size: int = bounded(224, ge=2, le=MAX_SIDE)
    """Default view side in pixels; a view with size 0 in ``views`` takes this."""
    batch_size: int = bounded(256, ge=1, le=2**20)
    """GLOBAL batch size (all ranks); each rank reads batch_size / world_size."""
    num_threads: int = bounded(2, ge=1, le=1024)
    """DALI CPU worker threads per rank."""
    prefetch: int = bounded(2, ge=1, le=64)
    """DALI prefetch queue depth (batches)."""
    device: str = "auto"
    """Where DALI decodes and augments: auto | cpu | gpu (auto = gpu if CUDA)."""
    reader: str = "folder"
    """folder (ImageFolder + validated file list) | webdataset (tar shards)."""
    webdataset: List[str] = field(default_factory=list)
    """Tar shard paths when reader = webdataset."""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    """torchvision ResNet: resnet18 | resnet34 | resnet50 | ..."""
    width: int = bounded(64, ge=1, le=4096)
    """Channels of the first stage (64 = torchvision's ResNet); smaller is cheaper."""
    small_stem: bool = False
    """3x3 stride-1 stem without max-pool, for 28-64 px images."""
    sync_bn: bool = True
    """Convert BatchNorm to SyncBatchNorm when distributed."""
    readout: str = "layer4:1"
    """Features evaluation reads: stage:grid items, e.g. layer4:2 = last stage pooled 2x2."""

    def __post_init__(self):
        parse_readout(self.readout)


def _check_method_name(self) -> None:
    if self.name not in METHODS:
        raise ValueError(f"name={self.name!r}: choose one of {', '.join(METHODS)}")


# ``method.name`` picks the method; ``method.<name>`` is each method's own section (the
# ``Config`` dataclass declared beside its class in bt_fast/methods/), so every method's
# heads and loss weights fall back to its own defaults whatever the config says of others.
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig",
    [("name", str, field(default="barlow_twins"))]
    + [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in METHODS.items()],
    namespace={"__post_init__": _check_method_name,
               "__doc__": "The SSL method and each method's hyper-parameters."})

MOVED = {"model.projector": "method.barlow_twins.projector", "loss.lambd": "method.barlow_twins.lambd",
         "loss.eps": "method.barlow_twins.eps", "loss.impl": "method.barlow_twins.impl"}
"""Keys of configs written before methods were pluggable, and where they live now."""


@dataclass
class OptimConfig:
    lr_weights: float = bounded(0.2, ge=0, le=1e3)
    """Peak LR of weights, per 256 images of global batch (official convention)."""
    lr_biases: float = bounded(0.0048, ge=0, le=1e3)
    """Peak LR of biases and BN parameters, per 256 images of global batch."""
    weight_decay: float = bounded(1e-6, ge=0, le=1)
    """As in the official code (the paper says 1.5e-6)."""
    momentum: float = bounded(0.9, ge=0, lt=1)
    """LARS momentum."""
    eta: float = bounded(0.001, gt=0, le=1)
    """LARS trust coefficient."""
    warmup_epochs: float = bounded(10.0, ge=0, le=1e6)
    """Linear warm-up length in epochs."""
    epochs: float = bounded(1000.0, gt=0, le=1e6)
    """Schedule length in epochs (cosine to 0.001x of peak at the end)."""


@dataclass
class TrainConfig:
    max_steps: int = bounded(0, ge=0, le=2**40)
    """Stop after this many steps (0 = run the whole schedule)."""
    precision: str = "bf16"
    """fp32 | bf16 | fp16 (fp16 uses a GradScaler, whose inf check syncs every step)."""
    channels_last: bool = True
    """Run the backbone in channels-last memory format."""
    compile: bool = False
    """torch.compile the step's model (the DDP wrapper when distributed)."""
    threads: int = bounded(0, ge=0, le=4096)
    """torch CPU threads per rank; 0 = auto (a CPU run: its share of the cores, >= 1)."""
    deterministic: bool = False
    """GPU: deterministic cuDNN/torch kernels instead of autotuned ones (slower)."""
    seed: int = bounded(0, ge=0, le=2**31 - 1)
    """Seeds torch and DALI (each rank's DALI seed is derived from it and the rank)."""
    log_every: int = bounded(10, ge=1, le=2**31 - 1)
    """Steps between metric logs (the only host<->device sync points)."""
    checkpoint_every: int = bounded(500, ge=0, le=2**31 - 1)
    """Steps between checkpoints (0 = only at the end)."""
    run_dir: str = "runs/default"
    """Folder for config.yaml, metrics.jsonl and checkpoints/."""
    stop_at: str = ""
    """End the run (checkpoint, exit 0) when the monitor reaches a target: "knn=85.0"
    (kNN top-1 at model.readout) or "linear=80" (the online probe); "" = never."""


@dataclass
class DistConfig:
    bucket_cap_mb: int = bounded(25, ge=1, le=2**16)
    """DDP gradient bucket size."""
    grad_compression: str = "none"
    """none | bf16 | powersgd: how DDP sends gradients (bt_fast/gradcomm.py, docs/gpu.md)."""
    powersgd_rank: int = bounded(4, ge=1, le=1024)
    """Rank of each compressed gradient's low-rank approximation (powersgd only)."""
    powersgd_start: int = bounded(0, ge=0, le=2**40)
    """Step from which PowerSGD compresses (plain fp32 before); 0 = the end of the warm-up."""
    static_graph: bool = True
    """DDP static_graph (valid: the graph is the same every step)."""


@dataclass
class MetricsConfig:
    prometheus: bool = False
    """Serve Prometheus metrics from every rank."""
    port: int = bounded(9400, ge=1, le=65535)
    """Rank r serves on port + local_rank."""
    host: str = "127.0.0.1"
    """Bind address of the exporter."""


@dataclass
class EvalConfig:
    every: int = bounded(0, ge=0, le=2**31 - 1)
    """Steps between kNN monitors (bt_fast/monitor.py), and at the last step; 0 = off."""
    bank: int = bounded(10000, ge=0, le=2**31 - 1)
    """Labelled bank: a seeded subset of this many data.train_dir images (0 = all)."""
    query: int = bounded(5000, ge=0, le=2**31 - 1)
    """Query set: a seeded subset of this many data.val_dir images (0 = all)."""
    online_probe: bool = False
    """Train a linear classifier on the detached backbone features every step."""
    probe_lr: float = bounded(0.1, gt=0, le=1e3)
    """The online probe's SGD learning rate (momentum 0.9, no weight decay, constant)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    # A YAML file without views (or with []) gets its method's preset (from_dict); a
    # Config() built in code starts with Barlow Twins', its default method.
    views: List[ViewSpec] = field(default_factory=presets.barlow_twins)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def resolved_views(cfg: Config) -> List[ViewSpec]:
    """cfg.views with size 0 ("unset") replaced by data.image_size."""
    return [dataclasses.replace(v, size=v.size or cfg.data.image_size) for v in cfg.views]


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Values the types allow but the trainer cannot use; ConfigError naming the key.

    Checked: every numeric field against the range declared next to it (a negative lr,
    a momentum of 5, a crop scale of [0, 0] or reversed, a zero std, NaN), the choices of
    the string fields and the method's view count. The global batch against the world
    size is bt_fast.train.check_data's (the world size is known only at launch).
    """
    if cfg.method.name not in METHODS:  # set in code after construction
        raise ConfigError(f"method.name={cfg.method.name!r}: choose one of {', '.join(METHODS)}")
    problem = METHODS[cfg.method.name].check_views([v.size for v in expand(resolved_views(cfg))])
    if problem:
        raise ConfigError(f"views: {problem}")
    choices = {"train.precision": (cfg.train.precision, ("fp32", "bf16", "fp16")),
               "data.device": (cfg.data.device, ("auto", "cpu", "gpu")),
               "data.reader": (cfg.data.reader, ("folder", "webdataset"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    # Every numeric field declares its range beside its definition (bounded(...));
    # one generic walk checks them all, so a new field cannot be forgotten here.
    for problem in bounds.problems(cfg):
        raise ConfigError(problem)
    gradcomm.validate(cfg)
    validate_eval(cfg)


def validate_eval(cfg: Config) -> None:
    """What the monitor's ranges (bounded above) cannot say: ``train.stop_at``."""
    try:
        target = parse_stop_at(cfg.train.stop_at)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from None
    if target and not cfg.eval.every:
        raise ConfigError(f"train.stop_at={cfg.train.stop_at!r} needs the monitor: set eval.every > 0")
    if target and target[0] == "linear" and not cfg.eval.online_probe:
        raise ConfigError(f"train.stop_at={cfg.train.stop_at!r} needs eval.online_probe=true")


def from_dict(values: dict, source: str = "<dict>", method: Optional[str] = None) -> Config:
    """Build a Config from plain data; errors name ``source`` and the key.

    A dict saved before methods were pluggable (no ``method`` section; Barlow Twins'
    settings in ``model.projector`` and ``loss``) is read as that Barlow Twins config.
    No ``views`` (or an empty list) means the method's own views (``method``, else
    ``method.name``): its preset from bt_fast.pipelines.presets at ``data.image_size``.
    """
    values = upgrade(values or {})
    name = method or _named_method(values) or MethodConfig().name
    try:
        values = take_method_views(values, name)
        if not values.get("views"):
            values = {**values, "views": method_views(name)}
        return build(Config, values, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def from_saved(values: dict, source: str) -> Config:
    """A config read back from a checkpoint (or named by ``--config`` for evaluation):
    ``from_dict`` plus every declared range, so a doctored or old file cannot ask eval or
    report for a 10^9-pixel image or a zero std. ConfigError naming the source and key."""
    cfg = from_dict(values, source)
    for problem in bounds.problems(cfg):
        raise ConfigError(f"{source}: {problem}")
    return cfg


def take_method_views(values: dict, name: str) -> dict:
    """A method section's own ``views`` (SwAV's and DINO's multi-crop) become the run's
    ``views`` when that method trains: moved up, so ``--set views.N.key=...`` edits them
    and the saved config.yaml lists, under ``views``, the views the run used."""
    section = (values.get("method") or {}).get(name) if isinstance(values.get("method"), dict) else None
    if not isinstance(section, dict) or not section.get("views"):
        return values
    views = section["views"]
    for i, item in enumerate(views if isinstance(views, list) else [views]):  # errors name the section
        build(ViewSpec, item, f"method.{name}.views[{i}]") if isinstance(item, dict) else None
    if not isinstance(views, list) or not all(isinstance(v, dict) for v in views):
        raise ConfigError(f"method.{name}.views: expected a list of view mappings, got {views!r}")
    method = {**values["method"], name: {**section, "views": []}}
    return {**values, "views": section["views"], "method": method}


def method_views(name: str) -> list[dict]:
    """The named method's preset views as plain data; size 0 = ``data.image_size``."""
    preset = METHODS[name].views_preset if name in METHODS else "barlow_twins"  # bad name: named later
    return [dataclasses.asdict(v) for v in presets.get(preset, size=0)]


def upgrade(values: dict) -> dict:
    """A pre-method config dict (no ``method`` section) with its MOVED keys moved."""
    model, loss = values.get("model"), values.get("loss")
    legacy = isinstance(loss, dict) or (isinstance(model, dict) and "projector" in model)
    if "method" in values or not legacy:
        return values
    values = {**values, "model": dict(model or {})}
    section = {k: v for k, v in (loss or {}).items()}
    if "projector" in values["model"]:
        section["projector"] = values["model"].pop("projector")
    values.pop("loss", None)
    values["method"] = {"name": "barlow_twins", "barlow_twins": section}
    return values


def reject_moved(values: dict, where: str) -> None:
    """Configs a user writes must use the new keys: one line saying where each went."""
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            raise ConfigError(f"{where}: {old} is now {new} (each method has its own heads and "
                              f"loss settings, under method.<name>)")
    if "loss" in values:
        raise ConfigError(f"{where}: the loss section is now method.barlow_twins (each method "
                          f"has its own loss settings, under method.<name>)")


def to_dict(cfg: Config) -> dict:
    """Plain-data form (tuples as lists) for YAML and checkpoints."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def load(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Defaults < YAML file < overrides. Raises ConfigError naming file and key."""
    values = read_yaml(path) if path else {}
    reject_moved(values, str(path or "<defaults>"))
    method = None
    if overrides:
        # The method --set names decides the views a file leaves to the method, before
        # other --set values (e.g. views.1.blur_p) apply to them.
        method = _final_method(values, overrides)
        base = to_dict(from_dict(values, str(path or "<defaults>"), method))
        values = apply_overrides(base, list(overrides))
        reject_moved(values, "--set")
    return from_dict(values, f"{path or '<defaults>'}{' + --set' if overrides else ''}", method)


def _named_method(values: dict) -> Optional[str]:
    method = values.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    return name if isinstance(name, str) else None  # anything else: build() names the type error


def _final_method(values: dict, overrides: list[str]) -> Optional[str]:
    """method.name after the overrides: whose views (its section's, else its preset when the
    file gives none) the run takes before other --set values apply to them."""
    name = _named_method(values)
    for item in overrides:
        path, value = parse_override(item)
        if path == ["method", "name"] and isinstance(value, str):
            name = value
    return name


def dump(cfg: Config) -> str:
    """The resolved config as the YAML text ``save`` writes."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | Path, inputs=()) -> None:
    """The resolved config as YAML, through the write gate (bt_fast.safeio): atomic,
    never through a link, never over one of ``inputs`` (the files the command read)."""
    safeio.write_atomic(path, dump(cfg), inputs=inputs)


def read_overlay(path: str | Path) -> list[str]:
    """An overlay file (e.g. from ``bt-fast tune``) as ``section.key=value`` overrides."""
    values = read_yaml(path)
    sets = []
    for section, items in values.items():
        if not isinstance(items, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        sets += [f"{section}.{k}={yaml_value(v)}" for k, v in items.items()]
    return sets


def with_value(cfg: Config, key: str, value: Any) -> Config:
    """A copy of ``cfg`` with ``key`` (``section.key``) set to ``value``."""
    return from_dict(apply_overrides(to_dict(cfg), [f"{key}={yaml_value(value)}"]))
