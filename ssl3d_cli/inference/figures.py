"""The uncertainty figure in the style of the paper's Figure 7 (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl3d_cli.files import atomic_output


def choose_slice(region: np.ndarray) -> int:
    """Index along the last axis with the largest area of ``region`` (the middle when empty)."""
    areas = region.reshape(-1, region.shape[-1]).sum(0)
    return int(areas.argmax()) if areas.any() else region.shape[-1] // 2


def uncertainty_figure(maps: dict[str, np.ndarray], outline: np.ndarray, *, case_id: str, target: str, outline_label: str,
                       out_path: Path) -> Path:
    """One panel per percentile map (X, Y, Z) on the slice through the target, red = certain, blue = uncertain.

    Args:
        maps: panel title -> (X, Y, Z) probability map in [0, 1], e.g. {"5th percentile": ..., ...}.
        outline: (X, Y, Z) bool region drawn as a black contour (truth if given, else the prediction).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = choose_slice(outline)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps) + 0.8, 3.6), squeeze=False)
    image = None
    for ax, (name, volume) in zip(axes[0], maps.items()):
        image = ax.imshow(np.rot90(volume[:, :, z]), cmap="jet", vmin=0.0, vmax=1.0, interpolation="nearest")
        if outline[:, :, z].any():
            ax.contour(np.rot90(outline[:, :, z].astype(float)), levels=[0.5], colors="black", linewidths=1.0)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{case_id}: p({target}) over MC samples, slice {z}; black: {outline_label}")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.025, label="probability (red: certain, blue: uncertain)")
    try:
        # An explicit format: what is written must not depend on the temporary file's name.
        with atomic_output(out_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)  # also when saving fails: pyplot keeps every open figure alive
    return out_path
