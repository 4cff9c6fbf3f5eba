"""Frozen, validated settings for each stage. Plain types only, so they serialise into every artefact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ssl3d_cli.errors import ConfigError

#: Augmentations SimCLR may draw from (paper section 2.1); ``cutout`` is optional and off by default.
SIMCLR_AUGMENTATIONS = ("rotate", "colour", "identity", "noise", "blur", "sobel", "cutout")
DEFAULT_SIMCLR_AUGMENTATIONS = ("rotate", "colour", "identity", "noise", "blur", "sobel")
#: The paper's best MC-dropout configuration (Figures 3-6): encoder dropout 0.3, decoder 0.0.
PAPER_DROPOUT_ENCODER = 0.3
VOTE_RULES = ("majority", "weighted", "weighted-probs", "borda", "union", "mean")


def _as_dict(obj: Any) -> dict[str, Any]:
    out = dataclasses.asdict(obj)
    return json.loads(json.dumps(out))  # tuples -> lists: what a JSON round trip gives back


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable 12-hex-digit hash of a settings dict (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_size(value: int | str | tuple[int, ...] | list[int], *, option: str = "--size") -> tuple[int, int, int]:
    """``128`` or ``"128"`` or ``"96,128,128"`` -> ``(D, H, W)``; errors name ``option``."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{option} {value!r}: expected one number or three, e.g. 128 or 96,128,128") from None
    elif isinstance(value, int):
        nums = [value]
    else:
        nums = [int(v) for v in value]
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or any(n < 8 for n in nums):
        raise ConfigError(f"{option} {value!r}: expected one number or three, each at least 8")
    return (nums[0], nums[1], nums[2])


def parse_int_list(value: str | list[int] | tuple[int, ...], *, option: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    try:
        return tuple(int(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{option} {value!r}: expected comma-separated integers, e.g. 16,32,64") from None


def parse_float_list(value: str | list[float] | tuple[float, ...], *, option: str) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    try:
        return tuple(float(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{option} {value!r}: expected comma-separated numbers, e.g. 1,2,2") from None


@dataclass(frozen=True)
class PreprocessConfig:
    """How scans are turned into the cache grid: the paper's fixed size (Appendix B.1), or a target spacing.

    ``spacing`` None: every crop box is resized to ``size`` (the paper's recipe, the default). A spacing (mm along
    the canonical R, A, S axes) selects the native-resolution mode (issue 15): each crop box is resampled to that spacing
    and keeps its own size (``data.spacing.native_size``); ``"auto"`` asks :func:`ssl3d_cli.stages.preprocess.preprocess`
    for the dataset's target spacing (``data.spacing.target_spacing``), which it records in the cache's settings.
    """

    size: tuple[int, int, int] = (128, 128, 128)
    modality: str = "auto"  # auto | ct | mr
    ct_body_threshold_hu: float = -500.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    dtype: str = "float16"
    spacing: tuple[float, float, float] | str | None = None  # None: fixed size | (x, y, z) mm | "auto" (dataset median)

    @property
    def native(self) -> bool:
        """The native-resolution mode: a target spacing instead of a fixed grid size."""
        return self.spacing is not None

    def validate(self) -> PreprocessConfig:
        if self.modality not in ("auto", "ct", "mr"):
            raise ConfigError(f"--modality {self.modality!r}: choose auto, ct or mr")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype {self.dtype!r}: choose float16 or float32")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"clip percentiles {self.clip_percentiles}: need 0 <= low < high <= 100")
        parse_size(self.size)
        if self.spacing is not None and self.spacing != "auto":
            from ssl3d_cli.data.spacing import parse_spacing

            try:
                parse_spacing(self.spacing)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        out = _as_dict(self)
        if self.spacing is None:  # the fixed-size recipe keeps the settings (and so the cache keys) it always had
            out.pop("spacing")
        return out

    def hash(self) -> str:
        return settings_hash(self.to_dict())


@dataclass(frozen=True)
class ModelConfig:
    """U-Net architecture shared by the SimCLR encoder and the segmenter."""

    in_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    dropout_encoder: float = 0.0
    dropout_decoder: float = 0.0
    projection_hidden: int = 256
    projection_dim: int = 128

    def validate(self) -> ModelConfig:
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ConfigError(f"--widths {','.join(map(str, self.widths))}: need at least two positive numbers, e.g. 16,32,64,128,256")
        for name in ("dropout_encoder", "dropout_decoder"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {rate}: must be in [0, 1)")
        return self

    def architecture(self) -> dict[str, Any]:
        """The parts that must match between an encoder checkpoint and a segmenter."""
        return {"in_channels": self.in_channels, "widths": list(self.widths)}

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    threads: int = 0  # 0: chosen from the cores available
    seed: int = 0
    deterministic: bool = False

    def validate(self) -> RuntimeConfig:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision {self.precision!r}: choose auto, fp32, bf16 or fp16")
        if self.threads < 0:
            raise ConfigError(f"--threads {self.threads}: must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class PretrainConfig:
    """3D SimCLR settings (paper section 2.1, Appendix B.2)."""

    epochs: int = 1000
    batch_size: int = 4  # scans per step (M)
    patches_per_side: int = 2  # K, P = K^3 patches per scan
    temperature: float = 0.05
    negatives: str = "batch"  # batch | volume
    augmentations: tuple[str, ...] = DEFAULT_SIMCLR_AUGMENTATIONS
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 10
    checkpoint_every: int = 10
    steps_per_epoch: int = 0  # 0: one pass over the scans
    workers: int = 2
    compile: str = "auto"  # torch.compile the augmentation's blend pass: auto (on CUDA) | on | off (augment.simclr)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self, size: tuple[int, int, int]) -> PretrainConfig:
        self.model.validate()
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"--compile {self.compile!r}: choose auto, on or off")
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature {self.temperature}: must be > 0 (the paper uses 0.05, 0.1 or 0.5)")
        if self.negatives not in ("batch", "volume"):
            raise ConfigError(f"--negatives {self.negatives!r}: choose batch or volume")
        unknown = [a for a in self.augmentations if a not in SIMCLR_AUGMENTATIONS]
        if unknown or not self.augmentations:
            raise ConfigError(f"--augmentations {','.join(self.augmentations)}: choose from {','.join(SIMCLR_AUGMENTATIONS)}")
        k = self.patches_per_side
        if k < 1 or any(s % k for s in size):
            raise ConfigError(f"--patches-per-side {k}: must divide the volume size {size} (e.g. 2 or 4 for 128)")
        patch = [s // k for s in size]
        levels = len(self.model.widths)
        if any(p < 2**levels for p in patch):  # keeps the bottleneck at least 2^3 (instance norm needs > 1 voxel)
            raise ConfigError(
                f"--patches-per-side {k}: patches of {patch} are too small for {levels} U-Net levels; "
                f"use fewer patches or fewer --widths"
            )
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every {self.checkpoint_every}: must be at least 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """U-Net fine-tuning settings (paper section 2.2, Appendix B.3)."""

    epochs: int = 400
    freeze_epochs: int = 25
    batch_size: int = 2
    label_fraction: float = 1.0
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    class_weights: tuple[float, ...] = ()
    include_background: bool = True
    dice_smooth: float = 1e-5
    loss: str = "dice"  # dice | dice-ce
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 5
    checkpoint_every: int = 10
    validate_every: int = 1
    augment: bool = True
    from_scratch: bool = False
    workers: int = 2
    # native-resolution caches only (issue 15): the training patch (None: chosen from the cases' median shape) and the
    # share of patches centred on a foreground voxel
    patch_size: tuple[int, int, int] | None = None
    foreground_oversampling: float = 1.0 / 3.0
    # trained with dropout at the rates MC dropout later samples with (the paper's best: encoder 0.3, decoder 0)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dropout_encoder=PAPER_DROPOUT_ENCODER, dropout_decoder=0.0))

    def validate(self) -> FinetuneConfig:
        self.model.validate()
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}: must be at least 1")
        if self.freeze_epochs < 0:
            raise ConfigError(f"--freeze-epochs {self.freeze_epochs}: must be >= 0")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"--label-fraction {self.label_fraction}: must be in (0, 1], e.g. 0.1")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"--test-fraction {self.test_fraction}: must be in [0, 1)")
        if not 0 <= self.val_fraction <= 0.5:
            raise ConfigError(f"--val-fraction {self.val_fraction}: must be in [0, 0.5] (the share of the label budget held back "
                              "to select the best epoch; 0: none, keep the last epoch)")
        if self.loss not in ("dice", "dice-ce"):
            raise ConfigError(f"--loss {self.loss!r}: choose dice or dice-ce")
        if self.dice_smooth < 0:
            raise ConfigError(f"--dice-smooth {self.dice_smooth}: must be >= 0")
        if any(w < 0 for w in self.class_weights):
            raise ConfigError(f"--class-weights {self.class_weights}: weights must be >= 0")
        if self.patch_size is not None and (len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size)):
            raise ConfigError(f"--patch-size {self.patch_size}: three positive sizes, e.g. 128,128,64")
        if not 0 <= self.foreground_oversampling <= 1:
            raise ConfigError(f"--foreground-oversampling {self.foreground_oversampling}: must be in [0, 1]")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = _as_dict(self)
        if self.patch_size is None:  # the fixed grid: the settings (compared on --resume) it always had
            out.pop("patch_size")
            out.pop("foreground_oversampling")
        return out


@dataclass(frozen=True)
class MCConfig:
    """Monte-Carlo dropout inference settings (paper section 2.3)."""

    mc_samples: int = 0
    dropout_encoder: float | None = None  # None: the rate the model was trained with
    dropout_decoder: float | None = None
    vote: str = "majority"
    vote_weights: tuple[float, ...] = ()
    union_classes: tuple[str, ...] = ()
    mc_batch: int = 0  # 0: chosen from the model, grid and device (inference.mc.auto_mc_batch)
    seed: int = 0
    compile: str = "auto"  # torch.compile the sampler: auto (on CUDA) | on | off (inference.mc)

    def validate(self) -> MCConfig:
        if self.mc_samples < 0:
            raise ConfigError(f"--mc-samples {self.mc_samples}: must be >= 0 (0 or 1: one deterministic pass)")
        for name in ("dropout_encoder", "dropout_decoder"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {rate}: must be in [0, 1)")
        if self.vote not in VOTE_RULES:
            raise ConfigError(f"--vote {self.vote!r}: choose one of {', '.join(VOTE_RULES)}")
        if self.vote == "union" and not self.union_classes:
            raise ConfigError("--vote union needs --union-class NAME (e.g. --union-class tumour)")
        if self.mc_batch < 0:
            raise ConfigError(f"--mc-batch {self.mc_batch}: must be >= 0")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"--compile {self.compile!r}: choose auto, on or off")
        return self

    @property
    def stochastic(self) -> bool:
        return self.mc_samples >= 2

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)
