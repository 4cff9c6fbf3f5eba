"""``ssl3d predict``: MC-dropout segmentation with a vote rule, written in each scan's own geometry.

Every case gets a provenance record (:mod:`ssl3d_cli.provenance`); an existing case is kept only when its record
equals this run's and every file asked for exists, otherwise it is recomputed and the reason logged.
``predict_args.json`` describes this run and lists the cases it wrote, kept (each pointing to its own record) and
failed; it is replaced when a run starts and kept current after every case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssl3d_cli import __version__
from ssl3d_cli.config import MCConfig, RuntimeConfig
from ssl3d_cli.data.datasets import CaseSpec, discover_dataset, discover_inputs
from ssl3d_cli.data.nifti import write_like
from ssl3d_cli.data.shards import parse_shard, take_shard
from ssl3d_cli.data.splits import SPLIT_FILE, split_cases
from ssl3d_cli.errors import ConfigError, InputDataError, Ssl3dError, StopRequested
from ssl3d_cli.files import atomic_write_json, check_writable
from ssl3d_cli.inference.pipeline import (
    Segmenter,
    open_segmenter,
    prepare_scan,
    read_case_scan,
    sampling_rates,
    segmentation,
    validate_vote_options,
    vote_case,
)
from ssl3d_cli.provenance import (
    RunProvenance,
    file_sha256,
    provenance_path,
    read_provenance,
    remove_provenance,
    stale_reasons,
    write_provenance,
)
from ssl3d_cli.runtime import progress
from ssl3d_cli.runtime.device import describe_device

log = logging.getLogger("ssl3d")

#: BraTS 2018 nests its case folders one level deeper, under these folders of the collection.
BRATS_GROUP_FOLDERS = ("HGG", "LGG")
#: What a newly computed case is written for when it had no earlier output.
NEW_CASE = "new"


#: Folders already looked at, by (what was asked, folder): many scans of one dataset share their parent.
KnownFolders = dict[tuple[str, Path], str | None]


def _dataset_root_name(folder: Path, known: KnownFolders) -> str | None:
    """The dataset name of a folder with ``dataset.json`` or ``images/`` + ``labels/``; None for any other folder."""
    key = ("dataset", folder)
    if key not in known:
        is_root = (folder / "dataset.json").is_file() or ((folder / "images").is_dir() and (folder / "labels").is_dir())
        known[key] = discover_dataset(folder).name if is_root else None
    return known[key]


def _brats_collection_name(folder: Path, known: KnownFolders) -> str | None:
    """The name of a BraTS collection folder; None for any other folder."""
    key = ("brats", folder)
    if key not in known:
        spec = discover_dataset(folder)
        known[key] = spec.name if spec.layout == "brats" else None
    return known[key]


def input_dataset(path: Path, known: KnownFolders | None = None) -> str | None:
    """The dataset an input belongs to, named as preprocessing names it; None for loose scans.

    The input itself when it is a dataset folder; else the nearest folder up to two levels above it with a
    ``dataset.json`` or ``images/`` + ``labels/`` (``Task07/imagesTs``, ``Task07/imagesTs/x.nii.gz``); for a
    BraTS case folder, the collection holding it (above ``HGG/`` / ``LGG/`` in BraTS 2018). A folder that cannot
    be read as a dataset counts as none: the inputs are then loose scans.

    Args:
        path: one input of ``ssl3d predict`` / ``ssl3d uncertainty``.
        known: dataset folders already read, shared between the inputs of one command.
    """
    known = known if known is not None else {}
    path = Path(path).expanduser()
    if not path.exists():
        return None  # resolve_cases names the missing input
    path = path.resolve()
    try:
        for folder in ([path] if path.is_dir() else []) + list(path.parents)[:2]:
            name = _dataset_root_name(folder, known)
            if name is not None:
                return name
        if not path.is_dir():
            return None
        cases, dataset = discover_inputs([path])
        if dataset is not None:  # a BraTS collection
            return dataset.name
        if len(cases) == 1 and cases[0].case_id == path.name and len(cases[0].image_paths) > 1:  # a BraTS case folder
            return _brats_collection_name(path.parent.parent if path.parent.name.upper() in BRATS_GROUP_FOLDERS else path.parent, known)
    except InputDataError as exc:
        log.debug("%s: not read as part of a dataset (%s)", path, exc)
    return None


def inputs_dataset(inputs: list[Path], *, model_given: bool) -> str | None:
    """The one dataset the inputs belong to (None: loose scans, or several datasets with ``--model``).

    Raises:
        ConfigError: without ``--model``, inputs of several datasets (no one model fits them all).
    """
    known: KnownFolders = {}
    names = sorted({name for name in (input_dataset(p, known) for p in inputs) if name is not None})
    if len(names) > 1:
        if not model_given:
            raise ConfigError(f"the inputs belong to {len(names)} datasets ({', '.join(names)}); predict each with its own --model")
        log.warning("the inputs belong to %d datasets (%s); all are predicted with the one --model", len(names), ", ".join(names))
        return None
    return names[0] if names else None


def resolve_cases(inputs: list[Path], *, split: str | None, model_path: Path, series_uid: str | None = None) -> list[CaseSpec]:
    """Cases from the inputs; ``split='test'`` takes the held-out test cases of the model's fine-tuning run.

    ``series_uid`` (``--series``): in DICOM folders, only that series.
    """
    if split is None:
        cases, _ = discover_inputs(inputs, series_uid=series_uid)
        return cases
    if split != "test":
        raise ConfigError(f"--split {split!r}: only 'test' is supported (the held-out cases of the fine-tuning run)")
    split_path = model_path.parent / SPLIT_FILE
    if not split_path.exists():
        raise InputDataError(f"{split_path}: not found; --split test needs the model's fine-tuning run folder")
    test_ids = set(split_cases(split_path, "test"))
    if len(inputs) != 1:
        raise ConfigError("--split test takes exactly one dataset folder")
    spec = discover_dataset(inputs[0])
    cases = [CaseSpec(c.case_id, c.image_paths, series_uid=c.series_uid) for c in spec.cases if c.case_id in test_ids]
    if not cases:
        raise InputDataError(f"{inputs[0]}: none of the test cases of {split_path} are in this dataset")
    return cases


@dataclass
class BatchResult:
    """What a batch of cases came to so far.

    Attributes:
        done: each finished case's record.
        failed: ``{"case", "error"}`` of each case that raised an :class:`Ssl3dError` (with ``skip_bad``, or the one that stopped the batch).
        pending: ids of the cases not processed yet.
    """

    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StagedWork:
    """One case's work in three stages, so that a batch can overlap them (see :func:`run_cases`).

    Attributes:
        prepare: reads, checks and preprocesses a case; touches no file (a bad scan raises here, before any output is
            replaced). Runs in the prefetch thread when the batch is pipelined.
        compute: samples and restores a prepared case (the device's part); runs in the calling thread.
        write: writes a computed case's files and records, returns its record; runs in the writer thread when pipelined.

    Called as a function, it runs the three in turn: the sequential path is the same code.
    """

    prepare: Callable[[CaseSpec], Any]
    compute: Callable[[Any], Any]
    write: Callable[[Any], dict[str, Any]]

    def __call__(self, case: CaseSpec) -> dict[str, Any]:
        return self.write(self.compute(self.prepare(case)))


def _reraise(exc: BaseException) -> Callable[[], dict[str, Any]]:
    def again() -> dict[str, Any]:
        raise exc

    return again


def run_cases(cases: list[CaseSpec], work: Callable[[CaseSpec], dict[str, Any]], *, description: str, skip_bad: bool | None = False,
              result: BatchResult | None = None, on_case: Callable[[BatchResult], None] | None = None,
              prefetch: int = 0) -> BatchResult:
    """Run ``work`` on each case in turn, with a progress bar.

    A case whose ``work`` raises an :class:`Ssl3dError` (an unreadable scan, the wrong channels, ...) stops the
    batch with the same error, its message counting the cases left unprocessed and naming ``--skip-bad``; with
    ``skip_bad`` the case is listed in ``failed`` (and logged) and the batch goes on.

    With ``prefetch`` > 0 and a :class:`StagedWork`, the stages overlap: ``prefetch`` background threads prepare (read and
    preprocess) up to ``prefetch`` cases ahead of the one being computed, and another thread writes the previous case's
    files meanwhile (at most one case's writes in flight). Cases still finish, fail, are recorded (``on_case``) and
    advance the bar in order, with the same messages as the sequential run; a case counts as done once it is written.
    On Ctrl-C or a :class:`StopRequested` the write in flight finishes (it is listed as done) and nothing else starts.

    Args:
        cases: the cases, in order.
        work: computes and writes one case; returns its record.
        description: the progress bar's label.
        skip_bad: continue past failing cases; None: the command has no ``--skip-bad`` (the error is raised as it is).
        result: filled in place (so a caller still holds it when the batch stops); default a new one.
        on_case: called after each case, finished or failed (e.g. to keep a run record current).
        prefetch: cases prepared ahead (0: each case's stages in turn, nothing in the background).

    Returns:
        The done, failed and (none left) pending cases.
    """
    result = result if result is not None else BatchResult()
    result.pending = [c.case_id for c in cases]

    def finish(i: int, case: CaseSpec, record: Callable[[], dict[str, Any]], bar: Any) -> None:
        try:
            result.done.append(record())
        except StopRequested:  # SIGTERM/SIGUSR1: never a bad scan
            raise
        except Ssl3dError as exc:
            result.failed.append({"case": case.case_id, "error": str(exc)})
            if skip_bad is None:
                result.pending = result.pending[1:]
                raise
            if not skip_bad:
                result.pending = result.pending[1:]
                left = len(cases) - i
                raise type(exc)(f"{exc} ({left} of {len(cases)} case(s) not processed: this one and {left - 1} after it; "
                                "add --skip-bad to continue past bad scans and list them at the end)") from None
            log.warning("case %s: failed, skipped (%s)", case.case_id, exc)
        result.pending = result.pending[1:]
        if on_case is not None:
            on_case(result)
        bar.advance(1)

    with progress.task(description, total=len(cases)) as bar:
        if prefetch > 0 and isinstance(work, StagedWork) and cases:
            _run_pipelined(cases, work, prefetch, lambda i, case, record: finish(i, case, record, bar), result)
        else:
            for i, case in enumerate(cases):
                finish(i, case, lambda case=case: work(case), bar)
    return result


def _run_pipelined(cases: list[CaseSpec], work: StagedWork, prefetch: int,
                   finish: Callable[[int, CaseSpec, Callable[[], dict[str, Any]]], None], result: BatchResult) -> None:
    """:func:`run_cases`' overlapped loop: prepare ahead in one thread, compute here, write behind in another."""
    from concurrent.futures import Future, ThreadPoolExecutor, wait

    # one reader per case ahead: reading (gzip) and preprocessing release the GIL, so two scans prepare in about the
    # time of one on a many-core node; results are still taken in order
    readers = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="ssl3d-prefetch")
    writers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssl3d-write")
    prepared: dict[int, Future] = {}
    writing: tuple[int, CaseSpec, Future] | None = None

    def settle() -> None:
        """Wait for the write in flight and finish its case (done, or failed when writing raised)."""
        nonlocal writing
        if writing is not None:
            i, case, future = writing
            wait([future])  # interrupted here (Ctrl-C), the write stays in flight for the handler below
            writing = None
            finish(i, case, future.result)

    try:
        for i, case in enumerate(cases):
            for j in range(i, min(i + prefetch + 1, len(cases))):  # submitted in order; taken in order below
                if j not in prepared:
                    prepared[j] = readers.submit(work.prepare, cases[j])
            try:
                computed = work.compute(prepared.pop(i).result())
            except Exception as exc:  # a bad scan (or any failure) of this case: the case before it finishes first
                settle()
                finish(i, case, _reraise(exc))
                continue
            settle()
            writing = (i, case, writers.submit(work.write, computed))
            del computed
        settle()
    except BaseException:
        # Ctrl-C, a signal, or an error that stops the batch: the write in flight completes (its files are whole and its
        # record last, as always) and is listed; nothing new starts
        for future in prepared.values():
            future.cancel()
        if writing is not None:
            i, case, future = writing
            writing = None
            try:
                record = future.result()
            except BaseException as exc:  # noqa: BLE001 - the batch is stopping for another reason
                log.debug("case %s: write failed while stopping (%s)", case.case_id, exc)
            else:
                result.done.append(record)
                result.pending = [c for c in result.pending if c != case.case_id]
        raise
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)


def probability_axis(seg: Segmenter) -> dict[str, Any]:
    """What the 4th axis of ``<case>_probabilities.nii.gz`` holds (recorded in the case's provenance record)."""
    return {"axis": 3, "holds": "classes", "class_names": list(seg.dataset.class_names),
            "label_values": list(seg.dataset.label_values)}


def output_names(case_id: str, save_probabilities: bool) -> dict[str, str]:
    """The files a case gets inside the output folder, by kind."""
    names = {"segmentation": f"{case_id}.nii.gz"}
    if save_probabilities:
        names["probabilities"] = f"{case_id}_probabilities.nii.gz"
    return names


def write_viewer_tables(seg: Segmenter, out_dir: Path) -> dict[str, str]:
    """The model's class names and label values as a 3D Slicer colour table and an ITK-SNAP label file in ``out_dir``.

    One pair per output folder (the same for every case of one model); rewritten by each run, so they name the
    classes of the model that wrote the folder last.
    """
    from ssl3d_cli.data.colour_tables import write_label_tables

    tables = write_label_tables(out_dir, class_names=seg.dataset.class_names, label_values=seg.dataset.label_values)
    return {viewer: str(path) for viewer, path in tables.items()}


@dataclass
class PreparedCase:
    """A case read, checked and preprocessed (:func:`prepare_case_input`), nothing written yet.

    Attributes:
        case: the case.
        grid: the scan's grid (all that writing needs: the scan's voxels are not kept while sampling).
        image: (1, C, D, H, W) on the device; ``geometry`` maps results back to the scan.
        seconds: time spent preparing (summed into the case's ``seconds``).
        extra: what a command keeps of the scan beyond that (``ssl3d uncertainty``: the figure's underlay and truth).
    """

    case: CaseSpec
    grid: Any
    image: Any
    geometry: Any
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ComputedPrediction:
    """A case's labels (and mean probabilities) on its scan's grid, ready to write."""

    case: CaseSpec
    grid: Any
    labels: np.ndarray
    probabilities: np.ndarray | None
    seconds: float


def prepare_case_input(seg: Segmenter, case: CaseSpec) -> PreparedCase:
    """Read and check a case's scan and apply the model's preprocessing; touches no file (a bad scan raises here)."""
    t0 = time.perf_counter()
    scan = read_case_scan(seg, case)
    image, geometry = prepare_scan(seg, scan)
    return PreparedCase(case, scan.grid, image, geometry, time.perf_counter() - t0)


def compute_prediction(seg: Segmenter, prepared: PreparedCase, *, mc: MCConfig, union_classes: list[int],
                       save_probabilities: bool) -> ComputedPrediction:
    """Sample a prepared case and restore its labels (and mean probabilities) onto its scan's grid."""
    t0 = time.perf_counter()
    votes = vote_case(seg, prepared.image, prepared.geometry, mc)
    labels = segmentation(seg, votes, mc.vote, union_classes)
    probs = np.moveaxis(votes.mean_prob().numpy(), 0, -1).astype(np.float32) if save_probabilities else None
    return ComputedPrediction(prepared.case, prepared.grid, labels, probs, prepared.seconds + time.perf_counter() - t0)


def write_prediction(seg: Segmenter, computed: ComputedPrediction, out_dir: Path, *,
                     provenance: RunProvenance | None = None) -> dict[str, Any]:
    """Write ``<case>.nii.gz`` (and ``<case>_probabilities.nii.gz``), then the case's provenance record; returns its record.

    Once outputs are replaced, the old record is gone until the new one is written last.
    """
    t0 = time.perf_counter()
    case, grid, save_probabilities = computed.case, computed.grid, computed.probabilities is not None
    names = output_names(case.case_id, save_probabilities)
    record_path = provenance_path(out_dir, case.case_id)
    remove_provenance(record_path)
    out = write_like(computed.labels, grid, out_dir / names["segmentation"], kind="label", description="label map")
    record: dict[str, Any] = {"case": case.case_id, "segmentation": str(out)}
    probabilities = out_dir / output_names(case.case_id, True)["probabilities"]
    if computed.probabilities is not None:
        classes = ",".join(seg.dataset.class_names)  # the full order is in the provenance record (probabilities_axis)
        record["probabilities"] = str(write_like(computed.probabilities, grid, probabilities, kind="probability",
                                                 intent_name="class probs", description=f"class probabilities; axis 4: {classes}"))
    elif probabilities.exists():  # from an earlier computation of this case: it would not match the new labels
        probabilities.unlink()
        log.info("case %s: removed %s of an earlier run (no --save-probabilities now)", case.case_id, probabilities.name)
    record["seconds"] = round(computed.seconds + time.perf_counter() - t0, 3)
    if provenance is not None:
        case_record = provenance.case_record(case.case_id, case.image_paths, names, record["seconds"], series_uid=case.series_uid)
        if save_probabilities:
            case_record["probabilities_axis"] = probability_axis(seg)
        write_provenance(record_path, case_record)
        record["provenance"] = str(record_path)
    return record


def predict_stages(seg: Segmenter, out_dir: Path, *, mc: MCConfig, union_classes: list[int], save_probabilities: bool,
                   provenance: RunProvenance | None = None) -> StagedWork:
    """:func:`predict_one` as its three stages, for :func:`run_cases` to overlap."""
    return StagedWork(prepare=lambda case: prepare_case_input(seg, case),
                      compute=lambda prepared: compute_prediction(seg, prepared, mc=mc, union_classes=union_classes,
                                                                  save_probabilities=save_probabilities),
                      write=lambda computed: write_prediction(seg, computed, out_dir, provenance=provenance))


def predict_one(seg: Segmenter, case: CaseSpec, out_dir: Path, *, mc: MCConfig, union_classes: list[int],
                save_probabilities: bool, provenance: RunProvenance | None = None) -> dict[str, Any]:
    """Predict one case and write ``<case>.nii.gz`` (and ``<case>_probabilities.nii.gz``), then its provenance record.

    The scan is read and sampled before anything is touched, so a bad scan leaves the case's earlier files (and their
    record) as they were. Once outputs are replaced, the old record is gone until the new one is written last.
    """
    return predict_stages(seg, out_dir, mc=mc, union_classes=union_classes, save_probabilities=save_probabilities,
                          provenance=provenance)(case)


def predict_cases(seg: Segmenter, cases: list[CaseSpec], out_dir: Path, *, mc: MCConfig, union_classes: list[int] | None = None,
                  save_probabilities: bool = False, description: str = "Predicting", provenance: RunProvenance | None = None,
                  skip_bad: bool | None = None, result: BatchResult | None = None,
                  on_case: Callable[[BatchResult], None] | None = None, prefetch: int = 1) -> BatchResult:
    """Predict and write each case (what ``ssl3d predict`` and fine-tuning's test table both run).

    Args:
        provenance: when given, each case gets its ``<case>.provenance.json`` (``ssl3d predict``).
        skip_bad, result, on_case, prefetch: see :func:`run_cases` (``prefetch`` 0: each case's stages in turn).
    """
    work = predict_stages(seg, out_dir, mc=mc, union_classes=list(union_classes or []), save_probabilities=save_probabilities,
                          provenance=provenance)
    return run_cases(cases, work, description=description, skip_bad=skip_bad, result=result, on_case=on_case, prefetch=prefetch)


def check_prefetch(prefetch: int) -> None:
    """Refuse a negative ``--prefetch``."""
    if prefetch < 0:
        raise ConfigError(f"--prefetch {prefetch}: must be >= 0 (0: one case after the other; default 1)")


def logged_recompute(stages: StagedWork, why: dict[str, str]) -> StagedWork:
    """``stages`` logging, once a case is written, why it was recomputed (for cases that had earlier output)."""
    def write(computed: Any) -> dict[str, Any]:
        record = stages.write(computed)
        if why[record["case"]] != NEW_CASE:
            log.info("case %s: recomputed (%s)", record["case"], why[record["case"]])
        return record

    return StagedWork(prepare=stages.prepare, compute=stages.compute, write=write)


def run_provenance(seg: Segmenter, mc: MCConfig, union_classes: list[int]) -> RunProvenance:
    """This run's shared provenance; hashes the model file once."""
    return RunProvenance(model_path=str(seg.path.resolve()), model_sha256=file_sha256(seg.path), model_dataset=seg.dataset.name,
                         mc=mc.to_dict(), union_class_indices=tuple(union_classes), device=str(seg.device), precision=seg.precision.name)


def plan_cases(cases: list[CaseSpec], out_dir: Path, provenance: RunProvenance, *, save_probabilities: bool,
               overwrite: bool) -> tuple[list[tuple[CaseSpec, str]], list[CaseSpec]]:
    """Split the cases into those to compute (each with why) and those kept as they are.

    A case is kept only when its provenance record equals this run's and every file asked for exists.
    """
    todo: list[tuple[CaseSpec, str]] = []
    kept: list[CaseSpec] = []
    for case in cases:
        names = output_names(case.case_id, save_probabilities)
        record_path = provenance_path(out_dir, case.case_id)
        if not (out_dir / names["segmentation"]).exists() and not record_path.exists():
            todo.append((case, NEW_CASE))
        elif overwrite:
            todo.append((case, "--overwrite"))
        else:
            reasons = stale_reasons(read_provenance(record_path), provenance.identity(case.image_paths, series_uid=case.series_uid), out_dir,
                                    names)
            if reasons:
                todo.append((case, "; ".join(reasons)))
            else:
                kept.append(case)
    return todo, kept


def args_path(out_dir: Path, shard: str | None, stem: str = "predict_args") -> Path:
    """``predict_args.json``; one file per shard (``predict_args.shard-I-of-N.json``) when array jobs share ``-o``.

    ``stem`` names another command's record (``uncertainty_args``).
    """
    if shard is None:
        return out_dir / f"{stem}.json"
    index, count = parse_shard(shard)
    return out_dir / f"{stem}.shard-{index}-of-{count}.json"


def run_recorded(todo: list[tuple[CaseSpec, str]], work: Callable[[CaseSpec], dict[str, Any]], *, record_file: Path,
                 description: dict[str, Any], kept: list[dict[str, str]], progress_label: str, skip_bad: bool,
                 provenance_keys: tuple[str, ...] = ("provenance",), prefetch: int = 0) -> BatchResult:
    """Run the cases to compute while keeping the run's record (``predict_args.json``) current.

    The record is written when the run starts (``status: running``), after every case, and at the end
    (``finished``, or ``stopped`` when a bad scan without ``--skip-bad``, Ctrl-C or a signal ends the batch).

    Args:
        todo: each case to compute with why (:data:`NEW_CASE` or the reasons its earlier output was stale).
        work: computes and writes one case; its record holds ``case`` and, under ``provenance_keys``, record paths.
        record_file: the run's record.
        description: what the run is (model, settings, inputs), written at the top of the record.
        kept: one row per case kept as it was.
        progress_label: the progress bar's label.
        skip_bad: see :func:`run_cases`.
        provenance_keys: keys of ``work``'s record naming provenance files, listed (by file name) in ``written``.
        prefetch: see :func:`run_cases`; a case enters the record once it is written.
    """
    why = {case.case_id: reason for case, reason in todo}

    def save(batch: BatchResult, status: str) -> None:
        written = [{"case": r["case"], "why": why[r["case"]], **{k: Path(r[k]).name for k in provenance_keys}} for r in batch.done]
        atomic_write_json(record_file, {"status": status, **description, "written": written, "kept": kept, "failed": batch.failed,
                                        "not_processed": batch.pending})

    batch = BatchResult(pending=list(why))
    save(batch, "running")
    try:
        run_cases([c for c, _ in todo], work, description=progress_label, skip_bad=skip_bad, result=batch,
                  on_case=lambda b: save(b, "running"), prefetch=prefetch)
    except BaseException:  # a bad scan without --skip-bad, Ctrl-C, SIGTERM: the record says what was and was not done
        save(batch, "stopped")
        raise
    save(batch, "finished")
    return batch


def predict(
    inputs: list[Path | str],
    *,
    output: Path | str,
    model: Path | None = None,
    mc: MCConfig | None = None,
    runtime: RuntimeConfig | None = None,
    overwrite: bool = False,
    shard: str | None = None,
    split: str | None = None,
    save_probabilities: bool = False,
    skip_bad: bool = False,
    series: str | None = None,
    prefetch: int = 1,
) -> dict[str, Any]:
    """Segment every input case; an existing case is kept only when its provenance matches this run.

    Args:
        inputs: NIfTI / NRRD / MetaImage files, DICOM series folders, folders of scans, BraTS case folders, nnU-Net
            ``_0000`` folders or a dataset.
        output: folder for ``<case>.nii.gz``, ``<case>.provenance.json`` and ``predict_args.json``.
        model: ``model.pt`` or its run folder; default: the newest run fine-tuned on the inputs' dataset (for loose
            scans: the only fine-tuned run), named in a WARNING line.
        overwrite: recompute every case, even those whose provenance matches.
        split: ``"test"``: the held-out test cases of the model's fine-tuning run (inputs = the dataset).
        skip_bad: continue past cases that fail (listed in ``failed``); the CLI then exits 4.
        series: a SeriesInstanceUID: read only that series of each DICOM folder (default: every series, one case each).
        prefetch: cases read and preprocessed ahead, each in its own background thread, while the current one is sampled,
            its files written behind in another (0: one case after the other). Outputs are the same either way.

    Returns:
        ``predicted`` / ``written`` (with why), ``skipped_existing`` / ``kept``, ``failed`` (case, error), the records.
    """
    mc = (mc or MCConfig()).validate()
    runtime = (runtime or RuntimeConfig()).validate()
    check_prefetch(prefetch)
    paths = [Path(p) for p in inputs]
    seg = open_segmenter(model, runtime, dataset_name=inputs_dataset(paths, model_given=model is not None))
    mc = sampling_rates(seg, mc)
    union_classes = validate_vote_options(seg, mc)
    cases = take_shard(resolve_cases(paths, split=split, model_path=seg.path, series_uid=series), shard)
    out_dir = Path(output).expanduser()
    check_writable(out_dir)
    provenance = run_provenance(seg, mc, union_classes)
    todo, kept = plan_cases(cases, out_dir, provenance, save_probabilities=save_probabilities, overwrite=overwrite)
    why = {case.case_id: reason for case, reason in todo}
    log.info("Device: %s, precision %s; %d case(s) to predict (%d kept: same model, settings and inputs) with %s",
             describe_device(seg.device), seg.precision.name, len(todo), len(kept),
             f"{mc.mc_samples} MC samples (dropout encoder {mc.dropout_encoder}, decoder {mc.dropout_decoder}), vote {mc.vote}"
             if mc.stochastic else "one deterministic pass")
    record_file = args_path(out_dir, shard)
    description = {
        "tool_version": __version__, "model": {"path": provenance.model_path, "sha256": provenance.model_sha256,
                                               "dataset": seg.dataset.name, "chosen_by": seg.chosen_by or "--model"},
        "mc": mc.to_dict(), "runtime": runtime.to_dict(), "inputs": [str(p) for p in inputs], "split": split, "shard": shard,
        "series": series, "overwrite": overwrite, "save_probabilities": save_probabilities, "skip_bad": skip_bad, "prefetch": prefetch,
        "class_names": list(seg.dataset.class_names), "label_values": list(seg.dataset.label_values),
    }
    kept_records = [{"case": c.case_id, "provenance": provenance_path(out_dir, c.case_id).name} for c in kept]
    description["label_tables"] = write_viewer_tables(seg, out_dir)

    stages = predict_stages(seg, out_dir, mc=mc, union_classes=union_classes, save_probabilities=save_probabilities,
                            provenance=provenance)
    work = logged_recompute(stages, why)
    batch = run_recorded(todo, work, record_file=record_file, description=description, kept=kept_records, progress_label="Predicting",
                         skip_bad=skip_bad, prefetch=prefetch)
    return {"output": str(out_dir), "model": str(seg.path), "model_chosen_by": seg.chosen_by, "predicted": len(batch.done),
            "skipped_existing": len(kept), "kept": [c.case_id for c in kept],
            "written": [{"case": r["case"], "why": why[r["case"]]} for r in batch.done], "failed": batch.failed,
            "vote": mc.vote if mc.stochastic else "deterministic", "mc_samples": mc.mc_samples, "args": str(record_file),
            "label_tables": description["label_tables"], "cases": batch.done}
