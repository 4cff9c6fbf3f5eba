"""What a trained network must know of the data it was trained on: one type from cache to predictor.

A :class:`DatasetSummary` is read from the cache manifest, stored as ``"dataset"`` in ``encoder.pt``
and ``model.pt``, and read back by the predictor, so the class names, label values, evaluation
regions, modality, channels and preprocessing settings travel together instead of as loose fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset as a trained model sees it.

    Attributes:
        name: the dataset's name (MSD task folder, nnU-Net dataset, folder name).
        modality: ``ct`` or ``mr`` (decides cropping and normalisation).
        channel_names: input channels in the order the network takes them.
        class_names: one name per class, background first.
        label_values: the label-map value of each class (class index i <-> ``label_values[i]``).
        regions: evaluation regions as label values (BraTS WT/TC/ET), possibly empty.
        preprocess: the preprocessing settings (``PreprocessConfig.to_dict()``) the cache was made with.
        settings_hash: hash of ``preprocess``.
        cache: the cache folder the network was trained from (provenance only).
        cases, labelled: case counts of the cache.
    """

    name: str
    modality: str
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    preprocess: dict[str, Any]
    settings_hash: str
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    cache: str = ""
    cases: int = 0
    labelled: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def size(self) -> tuple[int, int, int]:
        """(D, H, W) of the cache grid."""
        s = self.preprocess["size"]
        return (int(s[0]), int(s[1]), int(s[2]))

    def preprocess_config(self) -> PreprocessConfig:
        """The settings that turn a raw scan into what the network was trained on."""
        s = self.preprocess
        spacing = s.get("spacing")  # absent: the fixed-size recipe (every cache and model before issue 15)
        return PreprocessConfig(size=tuple(s["size"]), modality=s["modality"], ct_body_threshold_hu=s["ct_body_threshold_hu"],
                                clip_percentiles=tuple(s["clip_percentiles"]), dtype=s["dtype"],
                                spacing=tuple(spacing) if isinstance(spacing, list) else spacing)

    def class_index(self, name_or_value: str) -> int:
        """A class by name (case-insensitive), original label value or internal index."""
        key = str(name_or_value).strip().lower()
        names = [n.lower() for n in self.class_names]
        if key in names:
            return names.index(key)
        if key.lstrip("-").isdigit() and int(key) in self.label_values:
            return self.label_values.index(int(key))
        raise ConfigError(f"class {name_or_value!r} is not one of this model's classes: "
                          + ", ".join(f"{n} ({v})" for n, v in zip(self.class_names, self.label_values)))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (it goes into weights-only checkpoints and JSON)."""
        return {"name": self.name, "modality": self.modality, "channel_names": list(self.channel_names),
                "class_names": list(self.class_names), "label_values": list(self.label_values),
                "regions": {k: list(v) for k, v in self.regions.items()}, "preprocess": dict(self.preprocess),
                "settings_hash": self.settings_hash, "cache": self.cache, "cases": self.cases, "labelled": self.labelled}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSummary:
        try:
            return cls(name=str(d["name"]), modality=str(d["modality"]), channel_names=tuple(d["channel_names"]),
                       class_names=tuple(d["class_names"]), label_values=tuple(int(v) for v in d["label_values"]),
                       regions={k: tuple(int(x) for x in v) for k, v in (d.get("regions") or {}).items()},
                       preprocess=dict(d["preprocess"]), settings_hash=str(d["settings_hash"]), cache=str(d.get("cache", "")),
                       cases=int(d.get("cases", 0)), labelled=int(d.get("labelled", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"dataset summary is incomplete ({exc.__class__.__name__}: {exc})") from None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], *, cache: str) -> DatasetSummary:
        """From a cache's ``manifest.json``."""
        cases = manifest["cases"]
        return cls(name=manifest["dataset"]["name"], modality=manifest["modality"], channel_names=tuple(manifest["channel_names"]),
                   class_names=tuple(manifest["class_names"]), label_values=tuple(manifest["label_values"]),
                   regions={k: tuple(v) for k, v in (manifest.get("regions") or {}).items()}, preprocess=dict(manifest["settings"]),
                   settings_hash=manifest["settings_hash"], cache=cache, cases=len(cases), labelled=sum(1 for c in cases if c["labelled"]))

    @classmethod
    def from_schema1_payload(cls, payload: dict[str, Any]) -> DatasetSummary:
        """From an ``encoder.pt``/``model.pt`` of checkpoint schema 1, which held these fields loose."""
        old = payload.get("dataset") or {}
        return cls(name=old.get("dataset", ""), modality=payload["modality"], channel_names=tuple(payload["channel_names"]),
                   class_names=tuple(payload.get("class_names") or old.get("classes") or ()),
                   label_values=tuple(payload.get("label_values") or old.get("label_values") or ()),
                   regions={k: tuple(v) for k, v in (payload.get("regions") or {}).items()}, preprocess=dict(payload["preprocess"]),
                   settings_hash=old.get("settings_hash", ""), cache=old.get("cache", ""), cases=int(old.get("cases", 0)),
                   labelled=int(old.get("labelled", 0)))
