"""Label tables for 3D Slicer (.ctbl) and ITK-SNAP (label description file): format, round trip, colours, atomic writes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ssl3d_cli.data import colour_tables
from ssl3d_cli.data.colour_tables import (
    ITKSNAP_LABELS_NAME,
    PALETTE,
    SLICER_TABLE_NAME,
    label_colour,
    read_itksnap_labels,
    read_slicer_table,
    write_label_tables,
)
from ssl3d_cli.data.synthetic import CT_CLASSES, MR_CLASSES
from ssl3d_cli.errors import InputDataError

HIPPOCAMPUS_CLASSES = {0: "background", 1: "anterior", 2: "posterior"}
DATASETS = {"ct": CT_CLASSES, "brats": MR_CLASSES, "hippocampus": HIPPOCAMPUS_CLASSES}

# One data line as ITK-SNAP's LoadFromFile parses it: IDX R G B A VIS MSH "LABEL", alpha a float 0-1.
ITKSNAP_LINE = re.compile(r'^\s*\d+\s+\d{1,3}\s+\d{1,3}\s+\d{1,3}\s+(0|1)(\.\d+)?\s+[01]\s+[01]\s+"[^"]*"$')


def write(tmp_path: Path, classes: dict[int, str]) -> dict[str, Path]:
    return write_label_tables(tmp_path, class_names=list(classes.values()), label_values=list(classes))


def data_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="ascii").splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_round_trip_keeps_values_names_and_colours(tmp_path, dataset):
    classes = DATASETS[dataset]
    paths = write(tmp_path, classes)
    assert paths == {"slicer": tmp_path / SLICER_TABLE_NAME, "itksnap": tmp_path / ITKSNAP_LABELS_NAME}

    slicer = read_slicer_table(paths["slicer"])
    itksnap = read_itksnap_labels(paths["itksnap"])
    for table in (slicer, itksnap):
        assert list(table) == sorted(classes)  # original values (BraTS keeps 4), background first
        assert {value: entry.name for value, entry in table.items()} == classes  # spaces survive Slicer's '_'
        for value, entry in table.items():
            assert entry.rgb == label_colour(value)
            assert (entry.opacity, entry.visible) == ((0.0, False) if value == 0 else (1.0, True))


def test_brats_gets_its_customary_colours(tmp_path):
    table = read_itksnap_labels(write(tmp_path, MR_CLASSES)["itksnap"])
    # ITK-SNAP's own defaults for 1, 2, 4, the colours BraTS figures use: necrotic core red, edema green, enhancing yellow
    assert [table[v].rgb for v in (1, 2, 4)] == [(255, 0, 0), (0, 255, 0), (255, 255, 0)]


def test_slicer_file_format(tmp_path):
    path = write(tmp_path, MR_CLASSES)["slicer"]
    text = path.read_text(encoding="ascii")
    assert text.startswith("# Color table file labels.ctbl\n# 4 values\n")
    assert text.endswith("\n")
    lines = data_lines(path)
    assert len(lines) == 4
    for line in lines:
        fields = line.split(" ")
        assert len(fields) == 6 and all(fields), line  # value name R G B A, single spaces, no empty token
        numbers = [int(f) for f in (fields[0], *fields[2:])]
        assert all(0 <= n <= 255 for n in numbers[1:])
    assert lines[0] == "0 background 0 0 0 0"
    assert lines[1] == "1 necrotic/non-enhancing_core 255 0 0 255"
    assert lines[3] == "4 enhancing_tumour 255 255 0 255"


def test_itksnap_file_format(tmp_path):
    path = write(tmp_path, MR_CLASSES)["itksnap"]
    text = path.read_text(encoding="ascii")
    assert text.splitlines()[1] == "# ITK-SNAP Label Description File"
    lines = data_lines(path)
    assert len(lines) == 4
    for line in lines:
        assert ITKSNAP_LINE.match(line), line
        assert len(shlex.split(line)) == 8
    assert lines[0] == '    0     0    0    0        0  0  0    "background"'  # ITK-SNAP's "Clear Label" form
    assert lines[1] == '    1   255    0    0        1  1  1    "necrotic/non-enhancing core"'
    assert shlex.split(lines[3])[0] == "4"


def test_awkward_names_are_made_safe_for_both_formats(tmp_path):
    classes = {
        0: "",
        1: 'left "big" kidney',
        2: "Ödem\tperitumoral\nzone",
        3: "肝臓",
        4: "'''",
        5: "  liver  ",
        6: "Crohn's lesion",
        7: "x" * 300,
    }
    paths = write(tmp_path, classes)
    for path in paths.values():
        path.read_text(encoding="ascii")  # raises if anything non-ASCII got through
    for line in data_lines(paths["slicer"]):
        assert len(line.split()) == 6, line
    for line in data_lines(paths["itksnap"]):
        assert ITKSNAP_LINE.match(line), line
        assert len(shlex.split(line)) == 8, line

    slicer = {v: e.name for v, e in read_slicer_table(paths["slicer"]).items()}
    itksnap = {v: e.name for v, e in read_itksnap_labels(paths["itksnap"]).items()}
    assert slicer[0] == itksnap[0] == "background"  # never empty
    assert slicer[1] == 'left "big" kidney'  # Slicer splits on white space only: quotes are harmless there
    assert itksnap[1] == "left 'big' kidney"  # ITK-SNAP has no escape for a quote inside its quotes
    assert slicer[2] == itksnap[2] == "Odem peritumoral zone"
    assert slicer[3] == itksnap[3] == "Label 3"  # nothing ASCII left: ITK-SNAP's default name
    assert (slicer[4], itksnap[4]) == ("Label 4", "'''")  # Slicer strips ticks from both ends (and fails on a tick-only name)
    assert slicer[5] == itksnap[5] == "liver"
    assert slicer[6] == itksnap[6] == "Crohn's lesion"
    assert slicer[7] == itksnap[7] == "x" * colour_tables.MAX_NAME_LENGTH


def test_underscores_are_shown_as_spaces_by_slicer(tmp_path):
    paths = write(tmp_path, {0: "background", 1: "left_kidney"})
    assert read_slicer_table(paths["slicer"])[1].name == "left kidney"  # Slicer's reader turns every '_' into a space
    assert read_itksnap_labels(paths["itksnap"])[1].name == "left_kidney"


def test_colours_depend_on_the_label_value_only(tmp_path):
    first = write(tmp_path / "a", MR_CLASSES)
    again = write(tmp_path / "b", MR_CLASSES)
    for kind in first:
        assert first[kind].read_bytes() == again[kind].read_bytes()

    many = {value: f"class {value}" for value in range(0, 2 * len(PALETTE) + 2)}
    table = read_itksnap_labels(write(tmp_path / "c", many)["itksnap"])
    brats = read_itksnap_labels(first["itksnap"])
    assert table[4].rgb == brats[4].rgb  # value 4 has one colour whatever the other classes are
    assert table[0].rgb == (0, 0, 0)
    palette_run = [table[v].rgb for v in range(1, len(PALETTE) + 1)]
    assert len(set(palette_run)) == len(PALETTE)  # distinct within one cycle
    assert (0, 0, 0) not in palette_run
    assert table[len(PALETTE) + 1].rgb == table[1].rgb  # then the cycle starts again
    assert table[2 * len(PALETTE) + 1].rgb == table[1].rgb


def test_background_is_added_when_missing_and_values_are_sorted(tmp_path):
    paths = write_label_tables(tmp_path, class_names=["enhancing tumour", "edema"], label_values=[4, 2])
    for table in (read_slicer_table(paths["slicer"]), read_itksnap_labels(paths["itksnap"])):
        assert [(v, e.name) for v, e in table.items()] == [(0, "background"), (2, "edema"), (4, "enhancing tumour")]


@pytest.mark.parametrize(
    ("names", "values", "error", "message"),
    [
        (["background", "a"], [0, -1], InputDataError, "label value -1"),
        (["background", "a"], [0, 40000], InputDataError, "0 to 32767"),
        (["background", "a", "b"], [0, 1, 1], InputDataError, "given twice"),
        (["background"], [0, 1], ValueError, "1 class names for 2 label values"),
    ],
)
def test_bad_label_lists_are_refused(tmp_path, names, values, error, message):
    with pytest.raises(error, match=message):
        write_label_tables(tmp_path, class_names=names, label_values=values)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_writes_are_atomic_and_replace_old_tables(tmp_path):
    (tmp_path / SLICER_TABLE_NAME).write_text("old\n")
    paths = write(tmp_path, HIPPOCAMPUS_CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SLICER_TABLE_NAME, ITKSNAP_LABELS_NAME])  # no .tmp-* left
    assert read_slicer_table(paths["slicer"])[2].name == "posterior"


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def broken(labels):
        raise RuntimeError("disk full")

    monkeypatch.setattr(colour_tables, "format_itksnap_labels", broken)
    with pytest.raises(RuntimeError):
        write(tmp_path, CT_CLASSES)
    assert [p.name for p in tmp_path.iterdir()] == [SLICER_TABLE_NAME]


def test_readers_accept_files_written_by_the_viewers(tmp_path):
    # Lines as Slicer's and ITK-SNAP's own writers lay them out (ITK-SNAP: setw(3) columns, alpha as "1"/"0.5").
    slicer = tmp_path / "GenericLike.ctbl"
    slicer.write_text("# Color table file /tmp/x.ctbl\n# 3 values\n0 Background 0 0 0 0\n\n3 connective_tissue 111 184 210 255\n7 'tick' 1 2 3 128\n")
    itksnap = tmp_path / "snap.txt"
    itksnap.write_text(
        "################################################\n"
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL\n"
        '    0     0    0    0        0  0  0    "Clear Label"\n'
        '    1   255    0    0        1  1  1    "Label 1"\n'
        '   12    10   20   30      0.5  0  1    "half see-through"\n'
    )
    table = read_slicer_table(slicer)
    assert [(v, e.name, e.rgb) for v, e in table.items()] == [(0, "Background", (0, 0, 0)), (3, "connective tissue", (111, 184, 210)), (7, "tick", (1, 2, 3))]
    assert table[7].opacity == pytest.approx(128 / 255)
    snap = read_itksnap_labels(itksnap)
    assert [(v, e.name) for v, e in snap.items()] == [(0, "Clear Label"), (1, "Label 1"), (12, "half see-through")]
    assert (snap[12].rgb, snap[12].opacity, snap[12].visible) == ((10, 20, 30), 0.5, False)


def test_readers_name_the_file_and_line_of_a_bad_line(tmp_path):
    bad_slicer = tmp_path / "bad.ctbl"
    bad_slicer.write_text("# header\n1 organ 255 0\n")
    with pytest.raises(InputDataError, match=r"bad\.ctbl, line 2"):
        read_slicer_table(bad_slicer)
    bad_snap = tmp_path / "bad.txt"
    bad_snap.write_text("# header\n    1   255    0    0        1  1  1    no quotes\n")
    with pytest.raises(InputDataError, match=r"bad\.txt, line 2"):
        read_itksnap_labels(bad_snap)
    with pytest.raises(InputDataError, match="cannot read"):
        read_slicer_table(tmp_path / "missing.ctbl")
