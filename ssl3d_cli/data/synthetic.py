"""Synthetic datasets that look and behave like the paper's two tasks (for tests, the demo, trying the tool).

CT-like (pancreas-like): HU intensities (air, fat, soft tissue), an irregular contrast-enhanced organ
with a hypodense, fluid-like (cystic) lesion inside it, noise, varying field of view, anisotropic spacing
and several orientations. Labels 0 background / 1 organ / 2 lesion. The lesion is about half the organ's radius
(some 10-25% of its volume) and at least ``LESION_MIN_RADIUS_VOXELS`` scan voxels in radius along every
axis, always wrapped in organ tissue, so that it stays learnable after a small cache grid (the demo's 32^3).

MR-like (BraTS-like): four channels (FLAIR, T1, T1ce, T2) of a brain-like ellipsoid on a zero
background, with nested regions whole tumour (edema, 2) > core (necrosis, 1) > enhancing rim (4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORIENTATIONS = {
    "RAS": (1, 1, 1),
    "LPS": (-1, -1, 1),
    "LAS": (-1, 1, 1),
}
CT_CLASSES = {0: "background", 1: "organ", 2: "lesion"}
MR_CHANNELS = ["FLAIR", "T1w", "t1gd", "T2w"]
MR_CLASSES = {0: "background", 1: "necrotic/non-enhancing core", 2: "edema", 4: "enhancing tumour"}
#: Smallest lesion radius along each axis, in scan voxels: keeps it a few voxels across after the crop and resize.
LESION_MIN_RADIUS_VOXELS = 3.0
#: Organ tissue kept around the lesion, in scan voxels: the lesion sits in the gland and never borders soft tissue or fat.
LESION_RIM_VOXELS = 1.5


@dataclass
class SyntheticCase:
    """image: (X, Y, Z) or (X, Y, Z, C); label: (X, Y, Z) original values; affine: (4, 4)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def _affine(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    code = list(ORIENTATIONS)[rng.integers(len(ORIENTATIONS))]
    signs = ORIENTATIONS[code]
    aff = np.eye(4)
    for i in range(3):
        aff[i, i] = signs[i] * spacing[i]
        aff[i, 3] = -signs[i] * spacing[i] * shape[i] / 2 + rng.uniform(-20, 20)
    return aff


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 <= 1


def _lobes(rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray, lobes: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre, radii) of a few jittered ellipsoids around a centre."""
    out = []
    for _ in range(lobes):
        c = centre + rng.uniform(-0.6, 0.6, 3) * radii
        r = radii * rng.uniform(0.5, 0.9, 3)
        out.append((c, r))
    return out


def _union(x: np.ndarray, y: np.ndarray, z: np.ndarray, lobes: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    mask = np.zeros(x.shape, dtype=bool)
    for c, r in lobes:
        mask |= _ellipsoid(x, y, z, c, r)
    return mask


def _blob(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray,
          radii: np.ndarray, lobes: int = 4) -> np.ndarray:
    """Irregular solid: union of a few jittered ellipsoids around a centre (bool mask)."""
    return _union(x, y, z, _lobes(rng, centre, radii, lobes))


def _jitter_shape(rng: np.random.Generator, shape: tuple[int, int, int], amount: float = 0.15) -> tuple[int, int, int]:
    return tuple(max(12, int(round(s * rng.uniform(1 - amount, 1 + amount)))) for s in shape)  # type: ignore[return-value]


def make_ct_case(rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 32)) -> SyntheticCase:
    """One CT-like case (int16 HU)."""
    shape = _jitter_shape(rng, shape)
    x, y, z = _grid(shape)
    spacing = (float(rng.uniform(0.7, 1.0)),) * 2 + (float(rng.uniform(2.0, 4.0)),)
    bc = rng.uniform(-0.1, 0.1, 2)
    ra, rb = rng.uniform(0.7, 0.85), rng.uniform(0.55, 0.7)
    body_r = ((x - bc[0]) / ra) ** 2 + ((y - bc[1]) / rb) ** 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body_r <= 1] = -100.0  # subcutaneous fat
    image[body_r <= 0.8] = 50.0  # soft tissue (muscle, bowel)
    organ_c = np.array([bc[0] + rng.uniform(-0.25, 0.25), bc[1] + rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3)])
    organ_r = np.array([0.3, 0.2, 0.45])
    lobes = _lobes(rng, organ_c, organ_r)
    inside = body_r <= 0.75
    # The lesion: a hypodense (cystic) lesion near the centre of the organ's largest lobe, about half the organ's radius but at least
    # LESION_MIN_RADIUS_VOXELS voxels (one grid step is 2 / (n - 1)), wrapped in a rim of organ tissue (the gland around it).
    step = 2.0 / (np.asarray(shape, dtype=np.float64) - 1)
    host_c, host_r = max(lobes, key=lambda lobe: float(np.prod(lobe[1])))
    lesion_c = host_c + rng.uniform(-0.2, 0.2, 3) * host_r
    lesion_r = organ_r * rng.uniform(0.45, 0.6) * rng.uniform(0.9, 1.1, 3)
    lesion_r = np.minimum(np.maximum(lesion_r, LESION_MIN_RADIUS_VOXELS * step), 0.8 * organ_r)
    organ = (_union(x, y, z, lobes) | _ellipsoid(x, y, z, lesion_c, lesion_r + LESION_RIM_VOXELS * step)) & inside
    lesion = _ellipsoid(x, y, z, lesion_c, lesion_r) & (body_r <= 0.6)
    image[organ] = 110.0
    image[lesion] = rng.uniform(-5.0, 10.0)  # fluid-like: darker than the soft tissue too, not only than the organ
    image += rng.normal(0, 18, shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return SyntheticCase(np.clip(np.rint(image), -1024, 3071).astype(np.int16), label, _affine(rng, shape, spacing))


def make_mr_case(rng: np.random.Generator, shape: tuple[int, int, int] = (48, 56, 48)) -> SyntheticCase:
    """One MR-like case: (X, Y, Z, 4) float32 channels FLAIR, T1, T1ce, T2; BraTS labels 0/1/2/4."""
    shape = _jitter_shape(rng, shape, 0.1)
    x, y, z = _grid(shape)
    spacing = (1.0, 1.0, float(rng.uniform(1.0, 2.0)))
    brain_r = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.75) ** 2
    brain = brain_r <= 1
    c = np.array([rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.35), rng.uniform(-0.25, 0.25)])
    whole = _blob(rng, x, y, z, c, np.full(3, 0.32)) & brain
    dist = np.sqrt(((x - c[0]) / 0.16) ** 2 + ((y - c[1]) / 0.16) ** 2 + ((z - c[2]) / 0.16) ** 2)
    core = (dist <= 1) & whole
    necrotic = (dist <= 0.55) & whole
    label = np.zeros(shape, dtype=np.uint8)
    label[whole] = 2
    label[core] = 4
    label[necrotic] = 1
    # tissue, edema, enhancing, necrosis intensities per channel (FLAIR, T1, T1ce, T2)
    table = {
        "tissue": (300, 400, 420, 350),
        "edema": (650, 320, 340, 700),
        "enhancing": (500, 380, 900, 520),
        "necrotic": (380, 200, 220, 800),
    }
    channels = []
    for ch in range(4):
        img = np.zeros(shape, dtype=np.float32)
        img[brain] = table["tissue"][ch] * (1 + 0.15 * z[brain])  # a mild bias field
        img[label == 2] = table["edema"][ch]
        img[label == 4] = table["enhancing"][ch]
        img[label == 1] = table["necrotic"][ch]
        img[brain] += rng.normal(0, 25, int(brain.sum())).astype(np.float32)
        img[~brain] = 0.0
        channels.append(np.clip(img, 0, None))
    return SyntheticCase(np.stack(channels, axis=-1), label, _affine(rng, shape, spacing))


def make_small_lesion_ct(rng: np.random.Generator, shape: tuple[int, int, int] = (160, 160, 48),
                         spacing: tuple[float, float, float] = (0.8, 0.8, 2.5), radius_mm: float = 1.5,
                         lesions: int = 6) -> SyntheticCase:
    """A CT-like scan at clinical in-plane resolution with a few small spherical lesions (native-resolution evidence).

    Body (soft tissue, ~40 HU) in air (-1000 HU), an organ ellipsoid (~120 HU, label 1), and ``lesions`` spheres of
    ``radius_mm`` (220 HU, label 2) placed inside the organ; noise 10 HU. Sizes are in millimetres, so the lesions
    keep their physical size whatever the voxel grid. RAS axes, origin 0.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    coords = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*coords, indexing="ij")
    centre = np.asarray(shape) * spacing_arr / 2
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = _ellipsoid(x, y, z, centre, centre * np.array([0.85, 0.75, 1.2]))
    image[body] = 40.0
    organ = _ellipsoid(x, y, z, centre, centre * np.array([0.45, 0.4, 0.7]))
    image[organ] = 120.0
    label[organ] = 1
    placed = 0
    while placed < lesions:
        c = centre + rng.uniform(-1, 1, 3) * centre * np.array([0.3, 0.25, 0.4])
        if not organ[tuple(np.clip(np.round(c / spacing_arr).astype(int), 0, np.asarray(shape) - 1))]:
            continue
        sphere = _ellipsoid(x, y, z, c, np.full(3, radius_mm))
        image[sphere] = 220.0
        label[sphere] = 2
        placed += 1
    image += rng.normal(0.0, 10.0, shape).astype(np.float32) * body
    affine = np.diag([*spacing, 1.0])
    return SyntheticCase(image.astype(np.int16), label, affine)
