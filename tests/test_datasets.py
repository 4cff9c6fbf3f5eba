import json
import shutil

import numpy as np
import pytest

from ssl3d_cli.data.datasets import discover_dataset, discover_inputs, evaluation_regions
from ssl3d_cli.errors import InputDataError
from tests.conftest import save_nifti


def test_msd_layout(ct_dataset):
    spec = discover_dataset(ct_dataset)
    assert spec.layout == "msd" and spec.modality == "ct"
    assert spec.label_values == [0, 1, 2]
    assert spec.class_names == ["background", "organ", "lesion"]
    assert len(spec.cases) == 10 and len(spec.labelled_cases) == 8
    assert all(c.label_path is None for c in spec.cases if c.case_id in ("synthct_008", "synthct_009"))


def test_msd_4d_and_brats_regions(tmp_path):
    from ssl3d_cli.stages.synth import synth

    root = synth(tmp_path / "Task01", kind="mr", cases=2, unlabelled=0, shape=(16, 16, 16)).root
    spec = discover_dataset(root)
    assert spec.channel_names == ["FLAIR", "T1w", "t1gd", "T2w"] and spec.modality == "mr"
    assert spec.label_values == [0, 1, 2, 4]
    assert evaluation_regions(spec.class_names, spec.label_values) == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}


def test_brats_2018_layout(mr_brats_dataset):
    spec = discover_dataset(mr_brats_dataset)
    assert spec.layout == "brats"
    assert spec.channel_names == ["flair", "t1", "t1ce", "t2"]
    assert spec.label_values == [0, 1, 2, 4]
    assert len(spec.cases) == 4 and len(spec.labelled_cases) == 3
    case = spec.cases[0]
    assert [p.name.split("_")[-1] for p in case.image_paths] == ["flair.nii.gz", "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz"]


def test_brats_2023_naming_and_missing_modality(tmp_path):
    case = tmp_path / "BraTS23" / "BraTS-GLI-00000-000"
    for mod in ["t1c", "t1n", "t2f", "t2w", "seg"]:
        save_nifti(case / f"BraTS-GLI-00000-000-{mod}.nii.gz", np.zeros((8, 8, 8), np.float32))
    spec = discover_dataset(tmp_path / "BraTS23")
    assert spec.label_values == [0, 1, 2, 3]
    assert [p.name for p in spec.cases[0].image_paths][0].endswith("t2f.nii.gz")
    assert evaluation_regions(spec.class_names, spec.label_values)["ET"] == [3]
    (case / "BraTS-GLI-00000-000-t1n.nii.gz").unlink()
    with pytest.raises(InputDataError, match="BraTS-GLI-00000-000.*t1n"):
        discover_dataset(tmp_path / "BraTS23")


def test_nnunet_layout(tmp_path):
    root = tmp_path / "Dataset001_X"
    for case in ("a", "b"):
        for ch in range(2):
            save_nifti(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", np.zeros((8, 8, 8), np.float32))
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    save_nifti(root / "imagesTs" / "c_0000.nii.gz", np.zeros((8, 8, 8), np.float32))
    save_nifti(root / "imagesTs" / "c_0001.nii.gz", np.zeros((8, 8, 8), np.float32))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 3},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    spec = discover_dataset(root)
    assert spec.layout == "nnunet" and spec.channel_names == ["T1", "T2"]
    assert spec.label_values == [0, 3] and spec.class_names == ["background", "tumour"]
    assert [c.case_id for c in spec.cases] == ["a", "b", "c"] and not spec.cases[2].labelled
    (root / "imagesTr" / "a_0001.nii.gz").unlink()
    with pytest.raises(InputDataError, match="imagesTr/a: 1 channel"):
        discover_dataset(root)


def test_plain_and_images_labels(tmp_path):
    save_nifti(tmp_path / "plain" / "x.nii.gz", np.zeros((8, 8, 8), np.float32))
    save_nifti(tmp_path / "plain" / "y.nii", np.zeros((8, 8, 8), np.float32))
    spec = discover_dataset(tmp_path / "plain")
    assert spec.layout == "plain" and [c.case_id for c in spec.cases] == ["x", "y"]
    save_nifti(tmp_path / "il" / "images" / "x.nii.gz", np.zeros((8, 8, 8), np.float32))
    save_nifti(tmp_path / "il" / "images" / "y.nii.gz", np.zeros((8, 8, 8), np.float32))
    save_nifti(tmp_path / "il" / "labels" / "x.nii.gz", np.zeros((8, 8, 8), np.uint8))
    spec = discover_dataset(tmp_path / "il")
    assert spec.layout == "images-labels" and [c.labelled for c in spec.cases] == [True, False]


def test_dataset_json_errors(ct_dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(ct_dataset, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "../../etc/passwd.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputDataError, match="outside the dataset"):
        discover_dataset(root)
    meta["training"][0]["image"] = "./imagesTr/missing.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputDataError, match="missing.nii.gz which does not exist"):
        discover_dataset(root)
    with pytest.raises(InputDataError, match="not found"):
        discover_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no NIfTI scans"):
        discover_dataset(tmp_path / "empty")


def test_discover_inputs(ct_dataset, mr_brats_dataset, tmp_path):
    cases, ds = discover_inputs([ct_dataset])
    assert ds is not None and [c.case_id for c in cases] == ["synthct_008", "synthct_009"]
    brats_case = sorted(p for p in mr_brats_dataset.iterdir())[0]
    cases, _ = discover_inputs([brats_case])
    assert len(cases) == 1 and len(cases[0].image_paths) == 4
    files = sorted((ct_dataset / "imagesTr").iterdir())[:2]
    cases, _ = discover_inputs(files)
    assert [c.case_id for c in cases] == ["synthct_000", "synthct_001"]
    with pytest.raises(InputDataError, match="share names"):
        discover_inputs([files[0], files[0]])
