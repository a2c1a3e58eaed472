"""One config tree for a DINO run: code holds the defaults, YAML recipes hold overrides only.

Layers, last wins: the dataclass defaults below → a YAML recipe (``--config``) → dotted ``key=value`` overrides
from the command line. Every value is type-checked against the field's annotation; an unknown key or a value of
the wrong type is a :class:`ConfigError` that names the key. The resolved tree is written into the run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.spec import MultiCropSpec


class ConfigError(ValueError):
    """A config key or value a user wrote is wrong; the message says which and what is expected."""


@dataclass
class ModelConfig:
    # a timm ViT (vit_small_patch16_224, ...), ResNet (resnet50, ...) or XCiT (xcit_small_12_p16_224, ...)
    arch: str = "vit_small_patch16_224"
    patch_size: int = 0  # 0: the arch's own; e.g. 8 for small demo images (ViT, XCiT: 8 or 16)
    depth: int = 0  # 0: the arch's own number of blocks (ViT, XCiT)
    drop_path_rate: float = 0.1  # student only; the teacher has none
    out_dim: int = 65536
    norm_last_layer: bool = True
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    use_bn_in_head: bool = False  # the reference's --use_bn_in_head: BatchNorm1d after each hidden Linear of the head
    compile: bool = False  # torch.compile the student and teacher backbones (fuses the elementwise work; CUDA)
    compile_mode: str = "default"  # with compile: default | reduce-overhead (+ CUDA graphs) | max-autotune | ...
    pretrained: str = ""  # backbone weights to start from: .safetensors, timm or reference .pth (eval/weights.py)
    packed_crops: bool = False  # student: one backbone pass over all crops (per-token layers once, attention per size)
    # student: recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3
    # more compute); the teacher runs without gradients and needs none
    grad_checkpointing: bool = False


_REFERENCE_CROPS = MultiCropSpec()  # the crop defaults are the reference augmentation's (pipelines/spec.py)


@dataclass
class DataConfig:
    path: str = ""  # image folder (class sub-folders or flat), or "demo" for the embedded demo dataset
    backend: str = "torch"  # torch | dali | ffcv
    batch_size_per_gpu: int = 64
    num_workers: int = 10
    global_crop_size: int = _REFERENCE_CROPS.global_size
    local_crop_size: int = _REFERENCE_CROPS.local_size
    local_crops_number: int = _REFERENCE_CROPS.n_local
    global_crops_scale: tuple[float, float] = _REFERENCE_CROPS.global_scale
    local_crops_scale: tuple[float, float] = _REFERENCE_CROPS.local_scale
    blur_sigma: tuple[float, float] = _REFERENCE_CROPS.blur_sigma  # Gaussian blur σ range in pixels (for 224 px)
    # The photometric chain's probabilities and strengths (the reference's by default; every crop backend reads them)
    jitter_p: float = _REFERENCE_CROPS.jitter_p  # colour jitter, per crop
    jitter: tuple[float, float, float, float] = _REFERENCE_CROPS.jitter  # brightness, contrast, saturation, hue
    gray_p: float = _REFERENCE_CROPS.gray_p  # grayscale, per crop
    solarize_p: tuple[float, float, float] = _REFERENCE_CROPS.solarize_p  # G1, G2, each local crop
    demo_image_size: int = 64  # side of the generated demo images
    demo_images_per_class: int = 300
    ffcv_path: str = ""  # .beton written by dino-fast-convert (data.backend=ffcv)
    file_list: str = ""  # "path label" list written by dino-fast-convert: used instead of scanning data.path


@dataclass
class DinoConfig:
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    # the EMA momentum's cosine ends here (DINOv2's final_momentum_teacher); 1.0: the reference (the teacher freezes)
    momentum_teacher_end: float = 1.0
    loss_impl: str = "auto"  # auto | eager | triton   (env DINO_FAST_LOSS overrides)
    ema_impl: str = "auto"  # auto | foreach | triton  (env DINO_FAST_EMA overrides)
    centering: str = "centering"  # centering (the reference) | sinkhorn_knopp (DINOv2's teacher targets)
    sinkhorn_iterations: int = 3
    # Sinkhorn-Knopp over this step's teacher rows plus this many of the previous steps' (per rank, a FIFO queue of
    # teacher logits): the prototype balance is then spread over more images than one batch holds. 0: off (DINOv2).
    sinkhorn_queue: int = 0
    koleo_weight: float = 0.0  # DINOv2's KoLeo term on the student's global-crop CLS features; 0: off (reference)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (ViTs) | sgd (momentum 0.9; the reference's ResNet-50) | lars (the reference's LARS)
    epochs: int = 100
    lr: float = 0.0005  # peak lr for a global batch of 256; scaled linearly by global batch / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter clipping threshold; 0 disables
    freeze_last_layer: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run all epochs); schedules keep `epochs`
    # A step budget instead of an epoch count (0: off): optim.epochs becomes round(total_steps / steps per epoch) once
    # the data is known, so a recipe trains for about as many steps on a dataset of any size (the demo's 300).
    total_steps: int = 0


@dataclass
class TrainConfig:
    cuda_graph: bool = False  # capture the whole step once as a CUDA graph and replay it (one GPU, ZeRO-0)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0, 1 or 2 (3 is refused: the teacher EMA needs whole student parameters)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    steps_per_print: int = 1_000_000  # DeepSpeed's own logging; our progress display covers it
    # none | cpu: DeepSpeed keeps the optimizer's fp32 state and step on the CPU (ZeRO ≥ 1; docs/memory.md)
    offload_optimizer: str = "none"


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/dino"
    every_steps: int = 1000  # and at every epoch end of epochs at least this long; 0: epoch ends only
    keep_last: int = 3
    resume: str = "auto"  # auto: newest checkpoint in output_dir if any | none | a checkpoint folder


@dataclass
class LoggingConfig:
    progress: str = "auto"  # auto (rich live bar on a TTY, plain lines otherwise) | rich | plain | none
    print_every: int = 10  # plain-line interval in steps
    metrics_file: str = "metrics.jsonl"
    summary: bool = True  # at the end: k-NN, loss and entropy start → end, and <output_dir>/metrics.png
    tensorboard: bool = False  # also write every metric and the attention maps to <output_dir>/tb


@dataclass
class EvalConfig:
    knn_every_epochs: int = 0  # periodic k-NN on the held-out split; 0: off
    knn_at_start: bool = False  # also measure the initial (random) network, as the baseline to beat
    knn_at_end: bool = False  # and the trained one after the last step (when no periodic k-NN fell there)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_subset: int = 0  # 0: all
    knn_val_subset: int = 0
    attention_every_epochs: int = 0  # last block's CLS attention maps of a few held-out images as PNG; 0: off
    attention_images: int = 4  # how many (evenly spaced over the held-out split, the same ones every time)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


CHOICES: dict[str, tuple[str, ...]] = {
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.backend": ("torch", "dali", "ffcv"),
    "optim.name": ("adamw", "sgd", "lars"),
    "dino.loss_impl": ("auto", "eager", "triton"),
    "dino.ema_impl": ("auto", "foreach", "triton"),
    "dino.centering": ("centering", "sinkhorn_knopp"),
    "deepspeed.precision": ("auto", "bf16", "fp32"),
    "deepspeed.offload_optimizer": ("none", "cpu"),
    "logging.progress": ("auto", "rich", "plain", "none"),
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` (converting only lossless cases such as int → float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. data.path=2024 parsed by YAML as a number
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported annotation {tp}")  # pragma: no cover - programming error


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[:i])}' is a value, not a section)")
        hints = typing.get_type_hints(type(node))
        if part not in hints:
            known = ", ".join(sorted(hints))
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown config key '{key}': '{part}' is not in {where} (known: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ConfigError(f"config key '{key}' is a section; set its keys, e.g. '{key}.<name>=...'")
            coerced = _coerce(key, value, hints[part])
            if key in CHOICES and coerced not in CHOICES[key]:
                raise ConfigError(f"config key '{key}': {coerced!r} is not one of {', '.join(CHOICES[key])}")
            setattr(node, part, coerced)
        else:
            node = getattr(node, part)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"arch": ...}, "seed": 0}`` → ``{"model.arch": ..., "seed": 0}``."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=1e-3'`` → ``('optim.lr', 0.001)``; the value is read as YAML (numbers, true/false, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optim.lr=0.001)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot read the value ({exc.__class__.__name__})") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML recipe at ``path`` ← dotted overrides. Raises ConfigError naming any bad key or value."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist (recipes are in dino_fast/configs/)")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(tree).__name__}")
        for key, value in flatten(tree).items():
            _set(cfg, key, value)
    budget_before = cfg.optim.total_steps
    keys = set()
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
        keys.add(key)
    if "optim.epochs" in keys and "optim.total_steps" not in keys and budget_before > 0:
        # A recipe with a step budget (the demo) would silently ignore the epochs asked for on the command line.
        raise ConfigError(f"optim.epochs is given but the recipe sets optim.total_steps={budget_before}, which decides "
                          "the epochs: add optim.total_steps=0 to train optim.epochs epochs (or set optim.total_steps)")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Dotted ``key=value`` overrides on an existing config (checked as on the command line), then validated."""
    for text in overrides:
        _set(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single annotation cannot express."""
    checks = [
        (cfg.data.batch_size_per_gpu >= 1, "data.batch_size_per_gpu must be ≥ 1"),
        (cfg.data.local_crops_number >= 0, "data.local_crops_number must be ≥ 0"),
        (cfg.data.num_workers >= 0, "data.num_workers must be ≥ 0"),
        (cfg.optim.epochs >= 1, "optim.epochs must be ≥ 1"),
        (cfg.optim.total_steps >= 0, "optim.total_steps must be ≥ 0 (0: train optim.epochs epochs)"),
        (0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs, "optim.warmup_epochs must be in [0, optim.epochs]"),
        (cfg.dino.warmup_teacher_temp_epochs <= cfg.optim.epochs,
         "dino.warmup_teacher_temp_epochs must be ≤ optim.epochs"),
        (cfg.deepspeed.zero_stage in (0, 1, 2),
         "deepspeed.zero_stage must be 0, 1 or 2 (ZeRO-3 shards the student, which the teacher EMA reads whole)"),
        (cfg.model.out_dim >= 2, "model.out_dim must be ≥ 2"),
        (cfg.dino.sinkhorn_iterations >= 1, "dino.sinkhorn_iterations must be ≥ 1"),
        (cfg.dino.koleo_weight >= 0, "dino.koleo_weight must be ≥ 0"),
        (0 <= cfg.dino.momentum_teacher <= 1 and 0 <= cfg.dino.momentum_teacher_end <= 1,
         "dino.momentum_teacher and dino.momentum_teacher_end must lie in [0, 1]"),
        (cfg.dino.sinkhorn_queue >= 0, "dino.sinkhorn_queue must be ≥ 0"),
        (cfg.dino.sinkhorn_queue == 0 or cfg.dino.centering == "sinkhorn_knopp",
         "dino.sinkhorn_queue needs dino.centering=sinkhorn_knopp"),
        (not (cfg.dino.sinkhorn_queue and cfg.train.cuda_graph),
         "dino.sinkhorn_queue is not captured by train.cuda_graph=true (its fill level is read on the host); set "
         "dino.sinkhorn_queue=0 or train.cuda_graph=false"),
        (cfg.dino.koleo_weight == 0 or cfg.data.batch_size_per_gpu >= 2,
         "dino.koleo_weight needs data.batch_size_per_gpu ≥ 2 (nearest neighbours within a crop's batch)"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be ≥ 1"),
        (cfg.eval.attention_every_epochs >= 0 and cfg.eval.attention_images >= 1,
         "eval.attention_every_epochs must be ≥ 0 and eval.attention_images ≥ 1"),
        (all(0 < s <= 1 for s in cfg.data.global_crops_scale + cfg.data.local_crops_scale),
         "crop scales must lie in (0, 1]"),
        (0 < cfg.data.blur_sigma[0] <= cfg.data.blur_sigma[1],
         "data.blur_sigma must be [low, high] with 0 < low ≤ high (pixels)"),
        (all(0 <= p <= 1 for p in (cfg.data.jitter_p, cfg.data.gray_p, *cfg.data.solarize_p)),
         "data.jitter_p, data.gray_p and data.solarize_p are probabilities: each must lie in [0, 1]"),
        (min(cfg.data.jitter) >= 0 and cfg.data.jitter[3] <= 0.5,
         "data.jitter is [brightness, contrast, saturation, hue] strengths: each ≥ 0, hue ≤ 0.5"),
        (cfg.deepspeed.offload_optimizer == "none" or cfg.deepspeed.zero_stage >= 1,
         "deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage=1 or 2 (DeepSpeed offloads ZeRO's partitions)"),
        (not (cfg.train.cuda_graph and cfg.deepspeed.zero_stage != 0),
         "train.cuda_graph=true needs deepspeed.zero_stage=0 (ZeRO's gradient buckets cannot be captured); set "
         "model.compile=true model.compile_mode=reduce-overhead instead (CUDA graphs of the backbones only)"),
        (not (cfg.optim.name == "lars" and cfg.deepspeed.zero_stage > 0),
         f"optim.name=lars needs deepspeed.zero_stage=0 (ZeRO-{cfg.deepspeed.zero_stage} splits parameters into flat "
         "partitions, which would get one trust ratio each, not one per parameter); use optim.name=sgd with ZeRO"),
        (not (cfg.train.cuda_graph and cfg.optim.name != "adamw"),
         f"train.cuda_graph=true applies AdamW's decoupled weight decay on the device; optim.name={cfg.optim.name} "
         "adds its weight decay to the gradient, which the graph does not capture: set train.cuda_graph=false"),
        (not (cfg.train.cuda_graph and cfg.model.compile and cfg.model.compile_mode == "reduce-overhead"),
         "train.cuda_graph=true already captures the compiled backbones; use model.compile_mode=default with it"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def with_step_budget(cfg: Config, steps_per_epoch: int) -> Config:
    """``optim.total_steps`` > 0: a copy whose ``optim.epochs`` is round(total_steps / steps_per_epoch), the number
    of whole epochs closest to the budget (the schedules then run whole, as with an epoch count). Raises ConfigError
    when the budget is under half an epoch of this data, where no whole number of epochs comes near it."""
    budget = cfg.optim.total_steps
    if budget <= 0:
        return cfg
    epochs = round(budget / steps_per_epoch)
    if epochs < 1:
        raise ConfigError(f"optim.total_steps={budget} is less than half an epoch of this data ({steps_per_epoch} "
                          f"steps): set optim.total_steps=0 and optim.epochs=1 optim.max_steps={budget} (or a smaller "
                          f"data set) instead")
    warmup = max(cfg.optim.warmup_epochs, cfg.dino.warmup_teacher_temp_epochs)
    if warmup > epochs:
        raise ConfigError(f"optim.total_steps={budget} is {epochs} epoch(s) of this data ({steps_per_epoch} steps "
                          f"each), fewer than the warm-up's {warmup}: lower optim.warmup_epochs and "
                          f"dino.warmup_teacher_temp_epochs to ≤ {epochs}, or raise optim.total_steps")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=epochs))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    def convert(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return list(obj)
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return convert(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(tree: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in flatten(tree).items():
        _set(cfg, key, value)
    return cfg
