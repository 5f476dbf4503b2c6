"""Typed training config: dataclass defaults, then a YAML file, then ``key=value`` overrides.

The defaults are the upstream ``example/train.sh`` and ``example/finetune.sh`` values. The resolved
config is logged once by rank 0 and saved as ``config.yaml`` beside the checkpoints, where
fine-tuning, ``classify`` and ``extract-features`` read the model shape back.
"""
import dataclasses
import logging
import os
from dataclasses import dataclass, field

import yaml

from mlimages.config import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
PRECISIONS = ("float32", "bfloat16", "float16")
DEPTHS = (50, 101, 152)


@dataclass
class ModelConfig:
    depth: int = 101
    num_classes: int = 11166
    # float32, or mixed precision with bfloat16/float16 compute (GPUs); variables stay float32.
    precision: str = "float32"
    # XLA-compile the forward and backward pass (the Horovod all-reduce stays outside).
    xla: bool = False
    bn_momentum: float = 0.997
    bn_epsilon: float = 1e-5


@dataclass
class AugmentConfig:
    """The upstream training augmentation (image_preprocessing.py)."""
    min_object_covered: float = 0.7
    area_range: tuple = (0.7, 1.0)
    aspect_ratio_range: tuple = (0.75, 1.33)
    flip: bool = True
    # One of three branches per image: rotate then colour order A, colour order B, nothing.
    rotate: bool = True
    rotate_degrees: float = 45.0
    color: bool = True


@dataclass
class DataConfig:
    train_url: str = ""
    val_url: str = ""
    # Rows whose ``split`` column equals this are used ("" = every row of the dataset).
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    batch_size: int = 32  # per rank
    # Label lists are padded to this length for make_batch_reader (longer lists are an error).
    max_labels: int = 256
    shuffle_buffer: int = 2048
    # Reader threads; -1: none for local files (rows are read on the input pipeline's own
    # thread), 4 for object stores, whose latency must overlap with decoding.
    reader_workers: int = -1
    map_parallelism: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LossConfig:
    """The upstream multi-label loss (train.py); see loss.py."""
    pos_weight: float = 12.0
    mask_threshold: float = 0.7
    neg_select: float = 0.1
    weight_decay: float = 1e-4
    # Weight decay on batch-norm variables relative to the others (upstream: 0 pre-train).
    bn_weight_decay_scale: float = 0.0
    # Count positives over the global (all-reduced) batch and draw the negative selection with
    # one seed on every rank, so the counters are identical on all ranks.
    global_counters: bool = True
    seed: int = 1234


@dataclass
class ScheduleConfig:
    """Learning rate: staircase warm-up, then decay by ``decay_factor`` per ``decay_steps``.

    ``kind: pretrain`` is upstream train.py (warm-up growth, then 4 piecewise decays that apply
    once step > boundary); ``kind: staircase`` is upstream finetune.py
    (``lr * decay_factor ** floor(step / decay_steps)``, no warm-up).
    """
    kind: str = "pretrain"
    lr: float = 0.08
    warmup_lr: float = 0.01
    warmup_factor: float = 1.297
    warmup_interval: int = 4400
    warmup_steps: int = 35200
    decay_steps: int = 110000
    decay_factor: float = 0.1
    num_decays: int = 4
    # Horovod: multiply every rate by the number of ranks (the global batch grows with them).
    scale_with_ranks: bool = True
    optimizer: str = "momentum"  # momentum | sgd
    momentum: float = 0.9


@dataclass
class RunConfig:
    model_dir: str = "runs/train"
    max_steps: int = 440000  # absolute: a resumed run stops at the same step
    checkpoint_every: int = 4400
    keep_checkpoints: int = 200
    log_every: int = 100
    eval_every: int = 0  # 0: only at the end
    eval_steps: int = 0  # batches per rank per evaluation; 0: the whole validation shard
    metric_threshold: float = 0.5
    seed: int = 1234
    # Threads per rank for TensorFlow ops (0: cores / ranks on the node).
    intra_op_threads: int = 0


@dataclass
class FinetuneOptions:
    pretrained: str = ""  # a pre-training model_dir or checkpoint prefix
    # FixBlock2: train only stages 2-3 and the head (BN statistics of the rest still update).
    freeze_early: bool = True
    # Fine-tune at data.image_size, then from this step on at high_res_size (0: never).
    high_res_from_step: int = 0
    high_res_size: int = 299
    top_k: int = 5


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _finetune_data() -> DataConfig:
    return DataConfig(augment=AugmentConfig(min_object_covered=0.0, area_range=(0.05, 1.0)))


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_classes=1000))
    data: DataConfig = field(default_factory=_finetune_data)
    loss: LossConfig = field(default_factory=lambda: LossConfig(bn_weight_decay_scale=0.1))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        kind="staircase", lr=0.1, warmup_steps=0, decay_steps=150000, num_decays=0))
    run: RunConfig = field(default_factory=lambda: RunConfig(
        model_dir="runs/finetune", max_steps=600000, checkpoint_every=5000))
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)


def _build(cls, values: dict, where: str):
    """Builds dataclass ``cls`` from a mapping, recursing into nested dataclasses."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    default = cls()
    kwargs = {}
    for name, value in values.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            merged = {**dataclasses.asdict(current), **value} if isinstance(value, dict) else value
            kwargs[name] = _build(type(current), merged, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, current, f"{where}.{name}")
    return dataclasses.replace(default, **kwargs)


def _coerce(value, current, where: str):
    """Converts ``value`` to the type of the default ``current``, or explains why not."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(current):
            return tuple(float(v) for v in value)
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {value!r} is not a valid {type(current).__name__} "
                      f"(default {current!r})")


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides) -> dict:
    """``["run.max_steps=10", "data.image_size=64"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load(cls, path: str = "", overrides=()):
    """Defaults of ``cls``, then the YAML file at ``path`` (optional), then the overrides."""
    values: dict = {}
    where = cls.__name__
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"no config file {path}")
        with open(path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from None
        where = path
    tree = parse_overrides(overrides)
    _build(cls, tree, "override")  # a mistake on the command line is named as such
    values = _deep_merge(values, tree)
    config = _build(cls, values, where)
    validate(config)
    return config


def validate(config) -> None:
    """Rejects values that would fail late (mid-run) with a clear message now."""
    model = config.model
    if model.depth not in DEPTHS:
        raise ConfigError(f"model.depth must be one of {DEPTHS}, got {model.depth}")
    if model.precision not in PRECISIONS:
        raise ConfigError(f"model.precision must be one of {PRECISIONS}, got {model.precision}")
    if config.schedule.kind not in ("pretrain", "staircase"):
        raise ConfigError(f"schedule.kind must be pretrain or staircase, got "
                          f"{config.schedule.kind!r}")
    if config.schedule.optimizer not in ("momentum", "sgd"):
        raise ConfigError(f"schedule.optimizer must be momentum or sgd, got "
                          f"{config.schedule.optimizer!r}")
    if config.data.batch_size < 1 or config.data.image_size < 32:
        raise ConfigError("data.batch_size must be >= 1 and data.image_size >= 32")
    if config.data.reader_workers < -1:
        raise ConfigError("data.reader_workers must be -1 (automatic), 0 or more")
    if not 0 <= config.loss.neg_select <= 1:
        raise ConfigError(f"loss.neg_select must be in [0, 1], got {config.loss.neg_select}")


def to_dict(config) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def save(config, model_dir: str, kind: str) -> str:
    """Writes the resolved config (plus its kind) as ``config.yaml`` in ``model_dir``."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"kind": kind, **to_dict(config)}, handle, sort_keys=False)
    return path


def load_saved(model_dir: str):
    """Reads the config saved beside a run's checkpoints: returns (kind, config)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{model_dir} holds no {CONFIG_FILE}: not a training output folder")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    kind = values.pop("kind", "pretrain")
    cls = FinetuneConfig if kind == "finetune" else PretrainConfig
    return kind, _build(cls, values, path)
