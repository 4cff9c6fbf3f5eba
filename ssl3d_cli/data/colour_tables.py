"""Label names that travel with a segmentation: a 3D Slicer colour table and an ITK-SNAP label description file.

A predicted label map holds only numbers (BraTS 0/1/2/4, hippocampus 0/1/2). :func:`write_label_tables` writes two
small text files next to it, so that the segments open named and coloured in the two viewers our users have:

``labels.ctbl`` -- 3D Slicer's colour table file ("Color table file", ``.ctbl``/``.txt``)
    Sources: Slicer documentation, "Colors" developer guide, section "Color table file format (.txt, .ctbl)"
    (https://slicer.readthedocs.io/en/5.6/developer_guide/modules/colors.html), and the reader and writer in
    ``Libs/MRML/Core/vtkMRMLColorTableStorageNode.cxx`` (``ReadCtblFile``/``ReadDataInternal``,
    ``WriteDataInternal``) and ``vtkMRMLColorNode::SetColorNameWithSpaces`` in the Slicer repository. What they say:

    * Lines whose first character is ``#`` are comments; a line that is empty is skipped. The header Slicer itself
      writes is ``# Color table file <file name>`` then ``# <n> values``.
    * Every other line is ``value name R G B A``, separated by white space; R, G, B, A are 0-255 (Slicer divides by
      255 and clamps to 0-255). Values need not be contiguous: a value that is not listed is transparent and unnamed.
    * The name is read with C++ ``>>``, i.e. up to the next white space: there is no quoting or escaping, in old and
      current releases alike (current Slicer adds a separate ``.csv`` colour-table format that can quote; we do not
      write it). Slicer's writer replaces each space by ``_`` (``GetColorNameWithoutSpaces(i, "_")``) and its reader
      turns *every* ``_`` back into a space. So "necrotic core" is written ``necrotic_core`` and shown
      "necrotic core"; a name that had an underscore of its own is also shown with a space.
    * The reader strips ``'`` characters from both ends of a name ("ticks" from MRML files); a name made only of
      ``'`` makes it fail, so we strip them ourselves.
    * Slicer refuses a file whose largest value is above ``MaximumColorID`` (32768 in Slicer 4, 1000000 now), and
      Slicer 4 read lines into a 1024-byte buffer: we allow values up to 32767 and names up to 100 characters.
    * 0 is background; the documentation's own example writes it as ``0 Background 0 0 0 0`` (transparent).

``labels_itksnap.txt`` -- ITK-SNAP's "Label Description File"
    Sources: ``ColorLabelTable::LoadFromFile`` and ``ColorLabelTable::SaveToFile`` in ITK-SNAP's
    ``Logic/Common/ColorLabelTable.cxx`` (github.com/pyushkevich/itksnap), and the label files ITK-SNAP writes
    (header ``# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL``). What they say:

    * Lines starting with ``#`` and empty lines are skipped. Every other line is read as ``IDX R G B A VIS MSH``
      (integers, except A, a float 0-1 that is multiplied by 255), then the label is whatever lies between the next
      two double quotes: there is no escaping, so a ``"`` inside a name would cut it short; we write it as ``'``.
    * ITK-SNAP ignores the line for value 0 (``if(idx > 0)`` in the version read): its "Clear Label" (black, alpha 0,
      hidden, no mesh) cannot be changed. We still write value 0 in that form, as ITK-SNAP's own exports do, with the
      dataset's name for it.
    * ITK-SNAP label values are 16-bit unsigned; larger ones are reported not to display (AllenInstitute/AllenSDK
      issue 312). We stop at 32767 for Slicer's sake anyway.

Colours: label value ``v >= 1`` gets ``PALETTE[(v - 1) % len(PALETTE)]``, whatever the other classes are, so one
value has one colour in every run and every dataset. The first six entries are ITK-SNAP's own default colours for
labels 1-6 (``ColorLabelTable::m_ColorList``: pure red, green, blue, yellow, cyan, magenta): a segmentation looks the
same in ITK-SNAP with or without our file, and BraTS comes out in its customary colours (1 necrotic core red,
2 edema green, 4 enhancing tumour yellow). ITK-SNAP's list continues with pale colours (papaya whip, misty rose...)
that vanish on bright tissue, so values 7 and up take matplotlib's "tab10" qualitative palette without its grey;
after the 15 entries the sequence starts again. Background (0) is black and fully transparent in both files.

Names: both files are plain ASCII. Slicer and ITK-SNAP read them byte by byte with the C++ standard library, and
how they then decode non-ASCII bytes depends on the platform and version, so accents are folded (``Ödem`` ->
``Odem``), other non-ASCII characters dropped, control characters and line breaks turned into spaces, and a name
left empty replaced by ``Label <value>`` (``background`` for 0), ITK-SNAP's own default naming.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import logging
import operator
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ssl3d_cli import __version__
from ssl3d_cli.errors import InputDataError
from ssl3d_cli.files import atomic_write_text

logger = logging.getLogger(__name__)

#: File names written next to the predictions.
SLICER_TABLE_NAME = "labels.ctbl"
ITKSNAP_LABELS_NAME = "labels_itksnap.txt"

#: Largest label value written: Slicer 4 refuses colour tables above 32768; ITK-SNAP labels are 16-bit unsigned.
MAX_LABEL_VALUE = 32767
#: Longest name written, in characters: keeps every line well inside Slicer 4's 1024-byte line buffer.
MAX_NAME_LENGTH = 100

#: Colour of label value v >= 1 is PALETTE[(v - 1) % len(PALETTE)]; see the module docstring for the choice.
PALETTE: tuple[tuple[int, int, int], ...] = (
    # ITK-SNAP's default colours for labels 1-6
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    # matplotlib "tab10" without its grey (#7f7f7f)
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
BACKGROUND_RGB = (0, 0, 0)

# One data line of an ITK-SNAP label description file: IDX R G B A VIS MSH "LABEL" (what LoadFromFile accepts).
_ITKSNAP_LINE = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.eE+-]+)\s+(\d+)\s+(\d+)\s*"([^"]*)"')


@dataclass(frozen=True)
class LabelEntry:
    """One label as a viewer will show it.

    Attributes:
        value: the voxel value in the label map (the dataset's original value, e.g. BraTS 4).
        name: the name the viewer displays.
        rgb: red, green, blue, 0-255 each.
        opacity: 0 (transparent) to 1 (opaque).
        visible: whether the viewer shows the label at all (Slicer: opacity above 0; ITK-SNAP: the VIS column).
    """

    value: int
    name: str
    rgb: tuple[int, int, int]
    opacity: float
    visible: bool


def label_colour(value: int) -> tuple[int, int, int]:
    """The fixed colour of a label value: black for background, else the palette entry of that value.

    Args:
        value: label value, 0 or more.

    Returns:
        ``(R, G, B)``, 0-255 each.
    """
    if value == 0:
        return BACKGROUND_RGB
    return PALETTE[(value - 1) % len(PALETTE)]


def default_label_name(value: int) -> str:
    """The name used when a class has none (or none left after sanitising): ITK-SNAP's ``Label <value>``."""
    return "background" if value == 0 else f"Label {value}"


def write_label_tables(out_dir: Path, *, class_names: Sequence[str], label_values: Sequence[int]) -> dict[str, Path]:
    """Write ``labels.ctbl`` (3D Slicer) and ``labels_itksnap.txt`` (ITK-SNAP) into ``out_dir``, atomically.

    Both files list every class under its original label value, background (0) first, transparent and hidden;
    value 0 is added as ``background`` when ``label_values`` lacks it. Existing files are replaced.

    Args:
        out_dir: the folder holding the predictions; created when missing.
        class_names: one name per class, e.g. ``["background", "edema"]``.
        label_values: the label value of each class in the written label maps, same order, e.g. ``[0, 2]``.

    Returns:
        ``{"slicer": <out_dir>/labels.ctbl, "itksnap": <out_dir>/labels_itksnap.txt}``.

    Raises:
        ValueError: ``class_names`` and ``label_values`` differ in length.
        InputDataError: a label value is negative, above 32767, or listed twice.
    """
    labels = _label_list(class_names, label_values)
    out_dir = Path(out_dir)
    paths = {"slicer": out_dir / SLICER_TABLE_NAME, "itksnap": out_dir / ITKSNAP_LABELS_NAME}
    atomic_write_text(paths["slicer"], format_slicer_table(labels, file_name=SLICER_TABLE_NAME))
    atomic_write_text(paths["itksnap"], format_itksnap_labels(labels))
    logger.debug("wrote label tables for %d labels: %s, %s", len(labels), paths["slicer"], paths["itksnap"])
    return paths


def format_slicer_table(labels: Sequence[tuple[int, str]], *, file_name: str = SLICER_TABLE_NAME) -> str:
    """The text of a 3D Slicer colour table for ``(value, name)`` pairs (see the module docstring for the format).

    Args:
        labels: ``(label value, class name)`` pairs, in the order to write them.
        file_name: the name put in the ``# Color table file`` header line, as Slicer's own writer does.

    Returns:
        The whole file, ASCII, one ``value name R G B A`` line per label.
    """
    lines = [
        f"# Color table file {_clean_text(file_name) or SLICER_TABLE_NAME}",
        f"# {len(labels)} values",
        f"# Label names and colours of the ssl3d {__version__} segmentation next to this file.",
        "# value name R G B A (0-255); '_' in a name is shown as a space by 3D Slicer.",
    ]
    for value, name in labels:
        r, g, b = label_colour(value)
        alpha = 0 if value == 0 else 255  # background transparent, as in Slicer's documented example
        lines.append(f"{value} {_slicer_name(name, value)} {r} {g} {b} {alpha}")
    return "\n".join(lines) + "\n"


def format_itksnap_labels(labels: Sequence[tuple[int, str]]) -> str:
    """The text of an ITK-SNAP label description file for ``(value, name)`` pairs.

    Columns are laid out as in the files ITK-SNAP writes (right-aligned, the name in double quotes); ITK-SNAP itself
    only needs them separated by white space.

    Args:
        labels: ``(label value, class name)`` pairs, in the order to write them.

    Returns:
        The whole file, ASCII, one ``IDX R G B A VIS MSH "LABEL"`` line per label.
    """
    lines = [
        "################################################",
        "# ITK-SNAP Label Description File",
        f"# Label names and colours of the ssl3d {__version__} segmentation next to this file;",
        "# load it with Segmentation > Import Label Descriptions...",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   label value in the segmentation",
        "#    -R-:   red component (0..255)",
        "#    -G-:   green component (0..255)",
        "#    -B-:   blue component (0..255)",
        "#    -A-:   label opacity (0.00 .. 1.00)",
        "#    VIS:   label visibility (0 or 1)",
        "#    MSH:   label mesh visibility (0 or 1)",
        "#  LABEL:   label description, in double quotes",
        "################################################",
    ]
    for value, name in labels:
        r, g, b = label_colour(value)
        shown = 0 if value == 0 else 1  # 0 is ITK-SNAP's "Clear Label": transparent, hidden, no mesh
        lines.append(f'{value:>5}   {r:>3}  {g:>3}  {b:>3}  {shown:>7}  {shown}  {shown}    "{_itksnap_name(name, value)}"')
    return "\n".join(lines) + "\n"


def read_slicer_table(path: Path) -> dict[int, LabelEntry]:
    """Read a 3D Slicer colour table (``.ctbl``/``.txt``) the way Slicer reads it.

    Names come back as Slicer shows them: ``_`` turned into spaces, ``'`` stripped from both ends.

    Args:
        path: the colour table file.

    Returns:
        Label value -> entry, in file order; a value listed twice keeps its last line, as in Slicer.

    Raises:
        InputDataError: the file cannot be read, or a line is not ``value name R G B A`` with integers.
    """
    entries: dict[int, LabelEntry] = {}
    for number, line in _data_lines(path):
        fields = line.split()
        try:
            if len(fields) < 6:
                raise ValueError("fewer than 6 fields")
            value, r, g, b, a = (int(fields[i]) for i in (0, 2, 3, 4, 5))
        except ValueError:
            raise InputDataError(f"{path}, line {number}: not a 3D Slicer colour table line 'value name R G B A': {line.strip()!r}") from None
        name = fields[1].strip("'").replace("_", " ")
        rgb = (_clamp(r), _clamp(g), _clamp(b))
        opacity = _clamp(a) / 255
        entries[value] = LabelEntry(value=value, name=name, rgb=rgb, opacity=opacity, visible=opacity > 0)
    return entries


def read_itksnap_labels(path: Path) -> dict[int, LabelEntry]:
    """Read an ITK-SNAP label description file the way ITK-SNAP reads it.

    Unlike ITK-SNAP, which always keeps its own "Clear Label" for value 0, the line for 0 is returned as written.

    Args:
        path: the label description file.

    Returns:
        Label value -> entry, in file order.

    Raises:
        InputDataError: the file cannot be read, or a line is not ``IDX R G B A VIS MSH "LABEL"``.
    """
    entries: dict[int, LabelEntry] = {}
    for number, line in _data_lines(path):
        match = _ITKSNAP_LINE.match(line)
        try:
            if match is None:
                raise ValueError("no match")
            value, r, g, b = (int(match.group(i)) for i in range(1, 5))
            opacity = min(max(float(match.group(5)), 0.0), 1.0)
        except ValueError:
            raise InputDataError(f"{path}, line {number}: not an ITK-SNAP label line 'IDX R G B A VIS MSH \"LABEL\"': {line.strip()!r}") from None
        rgb = (_clamp(r), _clamp(g), _clamp(b))
        entries[value] = LabelEntry(value=value, name=match.group(8), rgb=rgb, opacity=opacity, visible=int(match.group(6)) != 0)
    return entries


def _label_list(class_names: Sequence[str], label_values: Sequence[int]) -> list[tuple[int, str]]:
    """Check the classes and return ``(value, name)`` pairs sorted by value, background (0) included."""
    if len(class_names) != len(label_values):
        raise ValueError(f"{len(class_names)} class names for {len(label_values)} label values; give one name per label value")
    labels: dict[int, str] = {}
    for raw_value, name in zip(label_values, class_names):
        value = operator.index(raw_value)  # accepts numpy integers, refuses floats such as 1.5
        if not 0 <= value <= MAX_LABEL_VALUE:
            raise InputDataError(f"label value {value} ({name!r}) cannot be written to a Slicer or ITK-SNAP label table: values must be 0 to {MAX_LABEL_VALUE}")
        if value in labels:
            raise InputDataError(f"label value {value} is given twice ({labels[value]!r} and {name!r}); each label value needs exactly one name")
        labels[value] = "" if name is None else str(name)
    labels.setdefault(0, "background")  # viewers treat 0 as background anyway; list it so both files start with it
    return sorted(labels.items())


def _clean_text(text: str) -> str:
    """Plain printable ASCII on one line: accents folded, other non-ASCII dropped, white space runs made one space."""
    text = unicodedata.normalize("NFKD", text)
    text = re.sub(r"[\s\x00-\x1f\x7f]+", " ", text)  # newlines and tabs would break either format's lines
    text = "".join(ch for ch in text if not unicodedata.combining(ch))  # "Ö" was split into "O" + a combining mark
    text = text.encode("ascii", "ignore").decode("ascii")
    return re.sub(r" +", " ", text).strip()[:MAX_NAME_LENGTH].strip()


def _slicer_name(name: str, value: int) -> str:
    """A name as one white-space-free token that Slicer's reader turns back into the name (``_`` -> space)."""
    # Slicer strips leading/trailing ticks itself, and fails on a name made only of them: strip them first.
    cleaned = _clean_text(name).strip("'").strip()
    return (cleaned or default_label_name(value)).replace(" ", "_")


def _itksnap_name(name: str, value: int) -> str:
    """A name that fits between ITK-SNAP's double quotes, which have no escape: ``"`` becomes ``'``."""
    cleaned = _clean_text(name).replace('"', "'").strip()
    return cleaned or default_label_name(value)


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """The non-comment, non-blank lines of a label table with their 1-based line numbers."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputDataError(f"{path}: cannot read label table ({exc.strerror})") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip() and not line.startswith("#")]


def _clamp(component: int) -> int:
    """A colour component clamped to 0-255, as both viewers do."""
    return min(max(component, 0), 255)
