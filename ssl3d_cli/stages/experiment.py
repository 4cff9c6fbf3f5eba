"""``ssl3d experiment NAME DATASET``: the paper's figures, reproducible, resumable and shardable.

``label-fractions`` (Figures 1-2): for each label fraction and repetition (seed), fine-tune from the
SimCLR encoder and from scratch on the same seeded split, evaluate on the fixed test cases.

``mc-dropout`` (Figures 3-6). Every model is trained with dropout at the rates it is sampled with
(MC dropout approximates Bayesian inference only then):

- Figure 3 (``deterministic`` vs ``site`` rows of the base model) and Figure 6 (vote rules): the
  label-fractions models, trained with encoder dropout 0.3 / decoder 0.0 (``trained_encoder`` /
  ``trained_decoder``), one deterministic pass (sampled rates 0/0) vs N samples at those rates.
- Figure 4 (``site`` rows of models trained 0.3/0.3, SimCLR): one more model per run trained with
  dropout 0.3 in encoder AND decoder, sampled with dropout in the encoder only / the decoder only / both.
- Figure 5 (``rate``, SimCLR models): one model per encoder rate 0.1, 0.2, 0.4, 0.5 (0.3 is the
  Figure-3 model), trained and sampled at that rate (decoder 0).

Each row also has the calibration of the mean probabilities (ECE over the whole scan and a region
around truth and prediction, Brier score). One MC run per (model, case, dropout setting) serves every
vote rule, since all rules come from the same running sums.

Each run writes ``row(s).json`` in its own folder; finished runs are skipped, ``--shard I/N`` takes
every N-th run, and ``--collect`` (or any unsharded call) merges ``results.csv``, ``summary.json``
and the plots. ``OUTPUT/experiment.json`` records the sizes (:class:`Settings`), seeds and fractions the
runs were made with; a rerun into the same folder with other sizes is refused, so one folder never mixes them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ssl3d_cli.calibration import CASE_KEYS as CALIBRATION_KEYS
from ssl3d_cli.calibration import case_calibration
from ssl3d_cli.config import VOTE_RULES, FinetuneConfig, MCConfig, ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.data.shards import parse_shard
from ssl3d_cli.data.splits import SPLIT_FILE, split_cases
from ssl3d_cli.errors import ConfigError
from ssl3d_cli.files import atomic_output, atomic_write_bytes, atomic_write_json
from ssl3d_cli.runtime import progress

log = logging.getLogger("ssl3d")
EXPERIMENTS = ("label-fractions", "mc-dropout")


@dataclass(frozen=True)
class Settings:
    """Sizes of one experiment; ``quick`` fits a CPU in minutes, the default is the paper's."""

    size: int
    widths: tuple[int, ...]
    patches_per_side: int
    pretrain_epochs: int
    finetune_epochs: int
    freeze_epochs: int
    mc_samples: int
    batch_size: int
    native: bool = False  # issue 15: caches at the dataset's target spacing, patch training, sliding-window inference

    @classmethod
    def make(cls, quick: bool, **overrides: Any) -> Settings:
        """The quick (CPU) or paper sizes, with any field given in ``overrides`` (``None`` values ignored) replaced."""
        base = cls(32, (8, 16, 32), 2, 20, 30, 5, 10, 2) if quick else cls(128, (16, 32, 64, 128, 256), 4, 1000, 400, 25, 100, 2)
        chosen = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(chosen) - set(asdict(base)))
        if unknown:
            raise ConfigError(f"experiment settings {', '.join(unknown)}: unknown; choose from {', '.join(asdict(base))}")
        return replace(base, **chosen).validate()

    def validate(self) -> Settings:
        counts = {"--size": self.size, "--pretrain-epochs": self.pretrain_epochs, "--finetune-epochs": self.finetune_epochs,
                  "--mc-samples": self.mc_samples, "batch size": self.batch_size, "patches per side": self.patches_per_side}
        for flag, value in counts.items():
            if value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        if not 0 <= self.freeze_epochs <= self.finetune_epochs:
            raise ConfigError(f"--freeze-epochs {self.freeze_epochs}: must be in [0, fine-tuning epochs {self.finetune_epochs}]")
        if not self.native and (self.size % self.patches_per_side or (self.size // self.patches_per_side) % 2 ** (len(self.widths) - 1)):
            raise ConfigError(f"--size {self.size}: each of the {self.patches_per_side}^3 SimCLR patches must be divisible by "
                              f"{2 ** (len(self.widths) - 1)} (the U-Net's down-sampling); choose a multiple of "
                              f"{self.patches_per_side * 2 ** (len(self.widths) - 1)}")
        return self

    def preprocess_config(self) -> PreprocessConfig:
        """The cache of these settings: the fixed ``size`` grid, or (``native``) the dataset's target spacing."""
        return PreprocessConfig(size=(self.size,) * 3, spacing="auto" if self.native else None)

    def record(self) -> dict[str, Any]:
        """What ``experiment.json`` compares; ``native`` only when set, so folders of fixed-grid runs keep their record."""
        out = asdict(self)
        if not self.native:
            out.pop("native")
        return out


#: Dropout rates (encoder, decoder) every fine-tuned model of the experiments is trained with: the paper's best.
BASE_DROPOUT = (0.3, 0.0)
#: Figure 4: trained with both, sampled at each site.
SITE_TRAINED = (0.3, 0.3)
SITE_SAMPLED = ((0.3, 0.0), (0.0, 0.3), (0.3, 0.3))
#: Figure 5: encoder rates, each its own model (0.3 is the base model).
RATES = (0.1, 0.2, 0.3, 0.4, 0.5)


def _run_id(method: str, fraction: float, seed: int, dropout: tuple[float, float] = BASE_DROPOUT) -> str:
    base = f"{method}-f{fraction:g}-s{seed}"
    return base if dropout == BASE_DROPOUT else f"{base}-enc{dropout[0]:g}-dec{dropout[1]:g}"


def _check_record(root: Path, record: dict[str, Any]) -> None:
    """Write ``ROOT/experiment.json`` on the first run; refuse a rerun whose sizes differ from it.

    Both experiments share ``ROOT/pretrain`` and ``ROOT/runs``, so the record is per output folder, not per experiment.
    """
    record = json.loads(json.dumps(record))  # tuples as JSON lists, so that a reread record compares equal
    path = root / "experiment.json"
    if not path.exists():
        atomic_write_json(path, record)
        return
    old = json.loads(path.read_text())
    if old.get("settings") != record["settings"]:
        changed = sorted(k for k in record["settings"] if (old.get("settings") or {}).get(k) != record["settings"][k])
        raise ConfigError(f"{root}: its runs were made with other settings ({', '.join(changed)}; see {path}); "
                          "use a new -o for these settings, or rerun with the recorded ones")
    merged = {**old, **{k: sorted(set(old.get(k) or []) | set(record[k])) for k in ("experiments", "fractions", "seeds")}}
    if merged != old:
        atomic_write_json(path, merged)


def _ensure_encoder(dataset: Path, out: Path, s: Settings, runtime: RuntimeConfig, encoder: Path | None, sharded: bool,
                    cache_root: Path | None) -> Path:
    if encoder is not None:
        return Path(encoder)
    path = out / "pretrain" / "encoder.pt"
    if path.exists():
        return path
    if sharded:
        raise ConfigError(f"--shard needs the encoder first: give --encoder, or run the experiment once without --shard "
                          f"(or `ssl3d pretrain {dataset} -o {out / 'pretrain'}`)")
    from ssl3d_cli.stages.pretrain import pretrain

    log.info("No --encoder: pretraining one into %s", path.parent)
    resume = (out / "pretrain" / "last.pt").exists()
    pretrain(dataset, config=PretrainConfig(epochs=s.pretrain_epochs, patches_per_side=s.patches_per_side, model=ModelConfig(widths=s.widths),
                                            workers=0 if s.size <= 32 else 2, temperature=0.05 if s.size > 32 else 0.1),
             runtime=runtime, preprocess_config=s.preprocess_config(), output=path.parent, resume=resume, cache_root=cache_root)
    return path


def _check_reusable(run_dir: Path, dropout: tuple[float, float]) -> None:
    """Refuse to reuse a finished run that was trained otherwise than this experiment says (e.g. by an older ssl3d,
    which trained without dropout and validated outside the label budget)."""
    import torch

    model = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True).get("model", {})
    trained = (model.get("dropout_encoder"), model.get("dropout_decoder"))
    split = json.loads((run_dir / SPLIT_FILE).read_text()) if (run_dir / SPLIT_FILE).exists() else {}
    if trained != dropout or "labelled_used" not in split:
        raise ConfigError(f"{run_dir}: a finished run trained with dropout {trained[0]} / {trained[1]}"
                          f"{'' if 'labelled_used' in split else ' and validation outside the label budget'} (an older ssl3d?); "
                          f"this experiment trains with {dropout[0]:g} / {dropout[1]:g} in the budget: use a new -o")


def _train(dataset: Path, run_dir: Path, *, method: str, fraction: float, seed: int, s: Settings, runtime: RuntimeConfig, encoder: Path,
           cache_root: Path | None, dropout: tuple[float, float] = BASE_DROPOUT) -> dict[str, Any]:
    """Fine-tune one model with dropout ``(encoder, decoder)`` (or reuse a finished one) and return its test table."""
    from ssl3d_cli.stages.finetune import finetune

    if (run_dir / "test_metrics.json").exists() and (run_dir / "model.pt").exists():
        _check_reusable(run_dir, dropout)
        return json.loads((run_dir / "test_metrics.json").read_text())
    config = FinetuneConfig(epochs=s.finetune_epochs, freeze_epochs=s.freeze_epochs, label_fraction=fraction, batch_size=s.batch_size,
                            from_scratch=method == "scratch", workers=0 if s.size <= 32 else 2,
                            model=ModelConfig(widths=s.widths, dropout_encoder=dropout[0], dropout_decoder=dropout[1]),
                            learning_rate=3e-3 if s.size <= 32 else 1e-3, val_fraction=0.2 if s.size <= 32 else 0.1)
    resume = (run_dir / "last.pt").exists()
    result = finetune(dataset, encoder=None if method == "scratch" else encoder, config=config, runtime=RuntimeConfig(**{**runtime.to_dict(), "seed": seed}),
             preprocess_config=s.preprocess_config(), output=run_dir, resume=resume, cache_root=cache_root)
    table = json.loads((run_dir / "test_metrics.json").read_text())
    table["train_seconds"] = result["seconds"]
    return table


def _models(run_dir: Path, method: str) -> list[tuple[str, Path, tuple[float, float], list[tuple[float, float]]]]:
    """(setting, run folder, trained rates, sampled rates) of one mc-dropout run: what each figure trains and samples."""
    base = [("site", run_dir, BASE_DROPOUT, [BASE_DROPOUT])]
    if method != "simclr":  # Figures 4 and 5 are drawn for the SimCLR models (as in the paper)
        return base
    site = [("site", run_dir.with_name(f"{run_dir.name}-enc{SITE_TRAINED[0]:g}-dec{SITE_TRAINED[1]:g}"), SITE_TRAINED, list(SITE_SAMPLED))]
    rates = [("rate", run_dir.with_name(f"{run_dir.name}-enc{r:g}-dec0"), (r, 0.0), [(r, 0.0)]) for r in RATES if (r, 0.0) != BASE_DROPOUT]
    return base + site + rates


def _score(seg: Any, votes: Any, truth: np.ndarray, truth_index: np.ndarray, rules: tuple[str, ...], spacing_mm: tuple[float, ...]) -> dict[str, Any]:
    """Dice per class for each rule, and the calibration of the mean probabilities (the same for every rule)."""
    from ssl3d_cli.inference.pipeline import segmentation
    from ssl3d_cli.metrics import dice

    label_values = seg.dataset.label_values
    calib, _, _ = case_calibration(votes.mean_prob().numpy(), truth_index, spacing_mm=spacing_mm)
    out: dict[str, Any] = {"calibration": calib, "dice": {}}
    for rule in rules:
        union = [seg.num_classes - 1] if rule == "union" else []  # the smallest structure (tumour / lesion)
        labels = segmentation(seg, votes, rule, union)
        out["dice"][rule] = [dice(labels == v, truth == v) for v in label_values[1:]]
    return out


def _mc_rows(run_dir: Path, method: str, test_ids: list[str], cache_dir: Path, *, s: Settings, runtime: RuntimeConfig,
             base: dict[str, Any]) -> list[dict[str, Any]]:
    """Dice and calibration of every MC setting and vote rule on the test cases of one run's models.

    Each case is prepared once per model and each dropout setting sampled once; every vote rule is
    read from the same samples, through the functions ``ssl3d predict`` uses (:func:`vote_case`,
    :func:`segmentation`).
    """
    import nibabel as nib

    from ssl3d_cli.data.cache import Cache
    from ssl3d_cli.data.nifti import spacing_from_affine
    from ssl3d_cli.data.preprocessing import map_labels
    from ssl3d_cli.inference.pipeline import open_segmenter, prepare_case, vote_case

    cache = Cache(cache_dir)
    per: dict[tuple, list[dict[str, Any]]] = {}
    for setting, model_dir, trained, sampled in _models(run_dir, method):
        seg = open_segmenter(model_dir / "model.pt", runtime)
        trained = (seg.model.config.dropout_encoder, seg.model.config.dropout_decoder)  # what the model file says, not the plan
        weights = tuple([1.0] + [2.0] * (seg.num_classes - 1))  # the paper: background 1, pancreas 2, tumour 2
        passes: list[tuple[str, tuple[float, float], int, tuple[str, ...]]] = [(setting, rates, s.mc_samples, ("majority",)) for rates in sampled]
        if model_dir == run_dir:  # the base model: Figures 3 and 6
            passes = [("deterministic", (0.0, 0.0), 0, ("majority",)), ("site", trained, s.mc_samples, VOTE_RULES)]
        for cid in test_ids:
            label_img = nib.load(str(cache.label_source(cid)))
            truth = np.asarray(label_img.dataobj).astype(np.int64)
            truth_index = map_labels(truth, list(seg.dataset.label_values), str(cache.label_source(cid)))
            spacing = spacing_from_affine(label_img.affine)
            image, geometry = prepare_case(seg, cache.case_spec(cid))
            for name, (enc, dec), n, rules in passes:
                mc = MCConfig(mc_samples=n, dropout_encoder=enc, dropout_decoder=dec, vote_weights=weights, seed=base["seed"])
                scores = _score(seg, vote_case(seg, image, geometry, mc, rules=rules), truth, truth_index, rules, spacing)
                for rule in rules:
                    key = (name, trained, enc, dec, rule)
                    per.setdefault(key, []).append({"dice": scores["dice"][rule], **scores["calibration"]})
    rows = []
    class_names = seg.dataset.class_names
    for (name, trained, enc, dec, rule), cases in per.items():
        mean = np.mean([c["dice"] for c in cases], axis=0)
        row = {**base, "setting": name, "trained_encoder": trained[0], "trained_decoder": trained[1], "dropout_encoder": enc,
               "dropout_decoder": dec, "vote": rule}
        row.update({f"dice_{n}": float(v) for n, v in zip(class_names[1:], mean)})
        row["dice_mean_fg"] = float(mean.mean())
        row.update({k: float(np.nanmean([c[k] for c in cases])) for k in CALIBRATION_KEYS})
        rows.append(row)
    # the base model sampled at its own rate 0.3 is the rate curve's 0.3 point
    rows += [{**r, "setting": "rate"} for r in rows if method == "simclr" and r["setting"] == "site" and r["vote"] == "majority"
             and (r["trained_encoder"], r["trained_decoder"]) == BASE_DROPOUT]
    return rows


def experiment(
    name: str,
    dataset: Path | str,
    *,
    output: Path | str,
    encoder: Path | None = None,
    quick: bool = False,
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0),
    repetitions: int = 1,
    seed: int = 0,
    runtime: RuntimeConfig | None = None,
    shard: str | None = None,
    collect_only: bool = False,
    cache_root: Path | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run (this shard of) an experiment, then merge results and plots unless sharded.

    ``settings`` overrides the quick/paper sizes (tests use it for seconds-long runs).
    """
    from ssl3d_cli.stages.preprocess import ensure_cache

    if name not in EXPERIMENTS:
        raise ConfigError(f"experiment {name!r}: choose {' or '.join(EXPERIMENTS)}")
    if repetitions < 1 or not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError("--repetitions must be >= 1 and --fractions in (0, 1]")
    runtime = (runtime or RuntimeConfig()).validate()
    s = (settings or Settings.make(quick)).validate()
    out = Path(output).expanduser() / name
    dataset = Path(dataset).expanduser()
    runs = [(m, f, seed + r) for r in range(repetitions) for f in fractions for m in ("simclr", "scratch")]
    index, count = parse_shard(shard)
    if not collect_only:
        from ssl3d_cli import __version__

        _check_record(out.parent, {"version": __version__, "dataset": str(dataset), "settings": s.record(), "experiments": [name],
                                   "fractions": sorted(fractions), "seeds": [seed + r for r in range(repetitions)],
                                   "encoder": str(encoder) if encoder else None})
        cache = ensure_cache(dataset, config=s.preprocess_config(), cache_root=cache_root)
        enc = _ensure_encoder(dataset, out.parent, s, runtime, encoder, count > 1, cache_root)
        mine = runs[index::count]
        with progress.task(f"Experiment {name}", total=len(mine)) as bar:
            for method, fraction, run_seed in mine:
                run_dir = out.parent / "runs" / _run_id(method, fraction, run_seed)
                rows_path = out / "rows" / f"{_run_id(method, fraction, run_seed)}.json"
                if rows_path.exists():
                    bar.advance(1)
                    continue
                table = _train(dataset, run_dir, method=method, fraction=fraction, seed=run_seed, s=s, runtime=runtime, encoder=enc,
                               cache_root=cache_root)
                used = table.get("labelled_used") or {}
                base = {"experiment": name, "method": method, "fraction": fraction, "seed": run_seed,
                        "train_cases": len(split_cases(run_dir / SPLIT_FILE, "train")), "selection_cases": used.get("selection"),
                        "train_seconds": table.get("train_seconds")}
                if name == "label-fractions":
                    rows = [{**base, "setting": "deterministic", "trained_encoder": BASE_DROPOUT[0], "trained_decoder": BASE_DROPOUT[1],
                             **{k: v for k, v in table["mean"].items() if k.startswith("dice")}}]
                else:
                    for _, model_dir, trained, _ in _models(run_dir, method)[1:]:
                        _train(dataset, model_dir, method=method, fraction=fraction, seed=run_seed, s=s, runtime=runtime, encoder=enc,
                               cache_root=cache_root, dropout=trained)
                    rows = _mc_rows(run_dir, method, split_cases(run_dir / SPLIT_FILE, "test"), cache.root, s=s, runtime=runtime, base=base)
                atomic_write_json(rows_path, rows)
                bar.advance(1)
    if count > 1 and not collect_only:
        return {"output": str(out), "shard": f"{index}/{count}", "runs": len(runs[index::count]),
                "next": f"ssl3d experiment {name} {dataset} -o {out.parent} --collect"}
    return collect(name, out, quick=quick)


def collect(name: str, out: Path, *, quick: bool) -> dict[str, Any]:
    """Merge every run's rows into results.csv and summary.json, and draw the plots."""
    rows: list[dict[str, Any]] = []
    for path in sorted((out / "rows").glob("*.json")):
        rows.extend(json.loads(path.read_text()))
    if not rows:
        raise ConfigError(f"{out}: no finished runs to collect yet")
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    summary = summarise(rows)
    atomic_write_json(out / "summary.json", summary)
    plots = draw_plots(name, summary, out)
    return {"output": str(out), "results": str(out / "results.csv"), "summary": summary, "plots": [str(p) for p in plots], "rows": len(rows)}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of the foreground Dice (and the calibration figures where present), per
    (method, fraction, setting, trained rates, sampled rates, vote)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["method"], r["fraction"], r["setting"], r.get("trained_encoder"), r.get("trained_decoder"),
               r.get("dropout_encoder", 0.0), r.get("dropout_decoder", 0.0), r.get("vote", "deterministic"))
        groups.setdefault(key, []).append(r)
    out = []
    for key, group in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        method, fraction, setting, t_enc, t_dec, enc, dec, vote = key
        dice_vals = [r["dice_mean_fg"] for r in group]
        entry = {"method": method, "fraction": fraction, "setting": setting, "trained_encoder": t_enc, "trained_decoder": t_dec,
                 "dropout_encoder": enc, "dropout_decoder": dec, "vote": vote, "dice_mean_fg": float(np.mean(dice_vals)),
                 "dice_std": float(np.std(dice_vals)), "n": len(group)}
        for k in CALIBRATION_KEYS:
            vals = [r[k] for r in group if r.get(k) is not None]
            if vals:
                entry[k], entry[f"{k}_std"] = float(np.nanmean(vals)), float(np.nanstd(vals))
        out.append(entry)
    return out


def _base_site(r: dict[str, Any]) -> bool:
    """A row of the base model (trained 0.3/0.0) sampled at its training rates."""
    return r["setting"] == "site" and (r["trained_encoder"], r["trained_decoder"]) == BASE_DROPOUT


def draw_plots(name: str, summary: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"simclr": "3D SimCLR", "scratch": "baseline (from scratch)"}
    paths = []
    if name == "label-fractions":
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method in ("simclr", "scratch"):
            pts = sorted((r["fraction"], r["dice_mean_fg"], r["dice_std"]) for r in summary if r["method"] == method)
            if pts:
                x, y, e = (np.array(v) for v in zip(*pts))
                ax.plot(x * 100, y, marker="o", label=labels[method])
                ax.fill_between(x * 100, y - e, y + e, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 25, 50, 100], ["5%", "10%", "25%", "50%", "100%"])
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("mean foreground Dice (test)")
        ax.set_title("Fine-tuning with fewer labels (Figures 1-2)")
        ax.legend()
        paths.append(_save(fig, out / "label_fractions.png"))
    else:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        fractions = sorted({r["fraction"] for r in summary})
        for ax, (title, select, xlab) in zip(axes, [
            ("Deterministic vs MC (Fig. 3)", lambda r: r["setting"] == "deterministic" or (_base_site(r) and r["vote"] == "majority"),
             lambda r: f"{'SimCLR' if r['method'] == 'simclr' else 'baseline'} {'MC' if r['setting'] == 'site' else 'det'}"),
            ("Dropout site (Fig. 4; trained 0.3/0.3)", lambda r: r["setting"] == "site" and r["method"] == "simclr"
             and (r["trained_encoder"], r["trained_decoder"]) == SITE_TRAINED,
             lambda r: {(0.3, 0.0): "encoder", (0.0, 0.3): "decoder", (0.3, 0.3): "both"}[(r["dropout_encoder"], r["dropout_decoder"])]),
            ("Encoder dropout rate (Fig. 5; trained = sampled)", lambda r: r["setting"] == "rate" and r["method"] == "simclr",
             lambda r: f"{r['dropout_encoder']:g}"),
            ("Vote rule (Fig. 6)", lambda r: _base_site(r) and r["method"] == "simclr", lambda r: r["vote"]),
        ]):
            width = 0.8 / max(len(fractions), 1)
            for i, f in enumerate(fractions):
                sel = [r for r in summary if select(r) and r["fraction"] == f]
                if title.startswith("Encoder"):
                    sel.sort(key=lambda r: r["dropout_encoder"])
                names = [xlab(r) for r in sel]
                pos = np.arange(len(sel)) + i * width
                ax.bar(pos, [r["dice_mean_fg"] for r in sel], width, yerr=[r["dice_std"] for r in sel], label=f"{f:g}")
                ax.set_xticks(np.arange(len(sel)) + width * (len(fractions) - 1) / 2, names, rotation=30, ha="right")
            ax.set_title(title)
            ax.set_ylabel("mean foreground Dice (test)")
        axes[0].legend(title="label fraction")
        paths.append(_save(fig, out / "mc_dropout.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
