"""The uncertainty figure in the style of the paper's Figure 7 (matplotlib, written as PNG).

How to read it: each panel is one percentile over the MC samples of p(target), the probability that a voxel belongs
to the target class (or classes, or region), drawn over the scan's slice in grey. Colour is that probability, from
0 (the class is unlikely) to 1 (the class is likely); voxels where it is below :data:`SHOW_FROM` are left uncoloured
so the anatomy shows. The model is uncertain where the panels disagree: a voxel coloured in the high percentile but
not in the low one was called the target by some samples and not by others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssl3d_cli.files import atomic_output

#: Probabilities below this are not coloured when the scan is drawn underneath.
SHOW_FROM = 0.01
#: The colour map of p(target) (the paper's Figure 7 uses a rainbow map: blue low, red high).
CMAP = "jet"


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def choose_slice(region: np.ndarray) -> int:
    """Index along the last axis with the largest area of ``region`` (the middle when empty)."""
    areas = region.reshape(-1, region.shape[-1]).sum(0)
    return int(areas.argmax()) if areas.any() else region.shape[-1] // 2


def _grey_window(slice_: np.ndarray) -> tuple[float, float]:
    """Display range of a scan slice: its 1st to 99th percentile (a flat slice gets a unit range)."""
    lo, hi = (float(v) for v in np.percentile(slice_, [1.0, 99.0]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def uncertainty_plot(maps: dict[str, np.ndarray], outline: np.ndarray, *, case_id: str, target: str, outline_label: str,
                     scan: np.ndarray | None = None, scan_label: str = "scan", samples: int | None = None) -> Any:
    """The figure (a matplotlib ``Figure``; the caller closes it): one panel per map on the slice through the target.

    Args:
        maps: panel title -> (X, Y, Z) probability of the target in [0, 1], e.g. {"5th percentile": ..., ...}.
        outline: (X, Y, Z) bool region drawn as a white contour (the truth if given, else the prediction).
        case_id, target: named in the title and the colour bar (``target`` as the user knows it: ``organ``, ``WT``).
        outline_label: what the contour is, e.g. ``true organ`` or ``predicted organ``.
        scan: (X, Y, Z) the scan on the same grid, drawn in grey under the maps (None: the maps alone, opaque).
        scan_label: which scan or channel that is (named in the title).
        samples: the number of MC samples (named in the title).
    """
    plt = _pyplot()
    z = choose_slice(outline)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps) + 1.2, 3.9), squeeze=False)
    heat = None
    grey = np.rot90(scan[:, :, z]) if scan is not None else None
    window = _grey_window(grey) if grey is not None else None
    for ax, (name, volume) in zip(axes[0], maps.items()):
        p = np.rot90(volume[:, :, z])
        if grey is not None:
            ax.imshow(grey, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
            heat = ax.imshow(np.ma.masked_less(p, SHOW_FROM), cmap=CMAP, vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
        else:
            heat = ax.imshow(p, cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        if outline[:, :, z].any():
            ax.contour(np.rot90(outline[:, :, z].astype(float)), levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(name)
        ax.axis("off")
    over = f" over {samples} MC samples" if samples else " over the MC samples"
    under = f" on the {scan_label}" if grey is not None else ""
    fig.suptitle(f"{case_id}, slice {z}: percentiles of p({target}){over}{under}\n"
                 f"white line: {outline_label}; uncertain where the panels disagree", fontsize=10)
    label = f"probability of {target}\n0: {target} unlikely, 1: {target} likely"
    if grey is not None:
        label += f"\n(no colour: below {SHOW_FROM:g})"
    fig.colorbar(heat, ax=axes[0].tolist(), fraction=0.025, label=label)
    return fig


def uncertainty_figure(maps: dict[str, np.ndarray], outline: np.ndarray, *, case_id: str, target: str, outline_label: str,
                       out_path: Path, scan: np.ndarray | None = None, scan_label: str = "scan", samples: int | None = None) -> Path:
    """Write :func:`uncertainty_plot` as a PNG (atomically) and return its path."""
    plt = _pyplot()
    fig = uncertainty_plot(maps, outline, case_id=case_id, target=target, outline_label=outline_label, scan=scan,
                           scan_label=scan_label, samples=samples)
    try:
        # An explicit format: what is written must not depend on the temporary file's name.
        with atomic_output(out_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)  # also when saving fails: pyplot keeps every open figure alive
    return out_path
