"""SimCLR augmentations for 3D patches, batched on the training device.

Every call transforms a whole batch (N, C, d, h, w) with per-sample random parameters drawn from
one ``torch.Generator``: no Python loop over patches. The same generator state gives the same views.

Random stream: which options each sample draws comes first, then every enabled transform, in the order
transforms are applied (below), draws its parameters for *all* N samples, whether or not a sample chose it.
So the stream never depends on the selection, and the two ways of applying a transform give the same views (bit for bit
on the CPU; on a GPU within float rounding, as cuDNN may pick other kernels for other batch sizes):
- blend (the default off the CPU): compute the transform on every sample and keep it where chosen
  (``torch.where``): a fixed number of kernel launches and no host synchronisation (no ``nonzero``, no
  boolean-mask indexing, no data-dependent branch), so the CPU keeps queueing work ahead of the GPU;
- subset (the default on the CPU): compute it on the chosen samples only (``index_select``/``index_copy``),
  which saves the arithmetic where a synchronisation costs nothing.

A view: each sample draws ``ops`` (default 2) *different* options uniformly at random from the enabled
augmentations (``identity`` is one option like the others: a slot that draws it does nothing), and the
drawn transforms are applied in the order rotate -> colour -> blur -> noise -> sobel -> cutout.
With the default six options (rotate, colour, identity, noise, blur, sobel) every transform is in a view
with probability 2/6 = 1/3; a view has one transform (identity drawn) with probability 1/3, two otherwise.
A view is left untouched only when every drawn slot is identity: never while another option is enabled
and ``ops`` >= 2; with ``ops`` = 1, with probability 1/(number of options). Both views of a pair are drawn
independently.

Parameter ranges (documented in the README):
- rotate: rigid in voxel units, about the patch centre. With prob. 1/2 an exact turn in a random plane
  ((d,h), (d,w) or (h,w), prob. 1/3 each): 90, 180 or 270 degrees (1/3 each) when the plane's two sides are
  equal, 180 degrees when they are not (the only shape-preserving turn there). Otherwise arbitrary angles:
  each axis independently with prob. 1/2 (at least one axis) by U(-30, 30) degrees (trilinear, border
  padding); on non-cubic patches the corners that leave the box are filled from the border.
- colour: brightness + U(-0.4, 0.4) std, contrast x U(0.6, 1.4) about the mean,
  gamma U(0.7, 1.5) on min-max scaled intensities; the three in random order per sample.
- blur: Gaussian, sigma U(0.5, 1.5) voxels (kernel radius 3).
- noise: additive Gaussian, sigma U(0, 0.2) x the sample's std.
- sobel: 3D Sobel gradient magnitude per channel, re-standardised (constant patches give zeros).
- cutout: one box of side U(0.2, 0.5) x patch size set to the sample mean.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch
import torch.nn.functional as F

from ssl3d_cli.errors import ConfigError
from ssl3d_cli.runtime.compiling import COMPILE_LOCK, failure_reason
from ssl3d_cli.runtime.device import is_out_of_memory

log = logging.getLogger("ssl3d")

#: Version of how views are drawn; recorded in a pretraining run's config so --resume refuses a run begun under another.
#: 1: identity vetoed the view with p 0.5 (ssl3d <= 0.1); 2: two options drawn per view, identity one of them;
#: 3: every enabled transform draws its parameters for all samples (the stream no longer depends on the selection).
VIEW_POLICY = 3
ORDER = ("rotate", "colour", "blur", "noise", "sobel", "cutout")  # the order drawn transforms are applied in
OPTIONS = ("identity", *ORDER)  # what a view's slots draw from (fixed order: the draw does not depend on how the list is spelled)
PLANES = ((2, 3), (2, 4), (3, 4))  # (d,h), (d,w), (h,w)
Params = dict[str, torch.Tensor]  # one transform's random parameters, first dimension the sample


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1, 1)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """:func:`_constant` outside ``torch.compile``: one copy per (values, device) per process."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 constant on ``device``, copied there once per process (a copy inside a step would synchronise);
    inside ``torch.compile`` a constant of the graph instead (the compiled code holds it).

    Never modify the result: it is shared.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    return _cached_constant(values, device)


def rotate90(x: torch.Tensor, chosen: torch.Tensor, plane: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Exact rotations: sample i (where chosen) is turned ``turns[i]`` x 90 degrees in plane ``plane[i]``.

    Planes are (d,h), (d,w), (h,w). A plane with unequal sides only allows 180 degrees (2 turns): odd turns there
    would change the patch shape, and raise ValueError. Groups samples by (plane, turns): up to 9 ``rot90`` calls,
    each behind a host synchronisation (the subset strategy; :func:`rotate90_grid` is the synchronisation-free one).
    """
    out = x.clone()
    for p, dims in enumerate(PLANES):
        square = x.shape[dims[0]] == x.shape[dims[1]]
        for k in (1, 2, 3):
            sel = chosen & (plane == p) & (turns == k)
            if not sel.any():
                continue
            if k % 2 and not square:
                raise ValueError(f"rotate90: a {k * 90} degree turn in plane {dims} of a {tuple(x.shape[2:])} patch changes its shape; use 2 turns")
            out[sel] = torch.rot90(x[sel], k, dims)
    return out


def _turn_table() -> tuple:
    """(9, 3, 3) nested tuple: row 3p + k - 1 maps an output voxel to the input voxel it reads under ``rot90(x, k, PLANES[p])``.

    Coordinates about the centre, in affine_grid's order (w, h, d). ``rot90`` by one turn in tensor dims (a, b) reads
    out[u_a, u_b] = x[u_b, -u_a]: input = R^k output with R = [[0, 1], [-1, 0]] on (a, b), cos/sin of k x 90 exact.
    """
    rows = []
    for a, b in PLANES:
        for k in (1, 2, 3):
            c, s = (1, 0, -1, 0)[k % 4], (0, 1, 0, -1)[k % 4]
            m = [[float(i == j) for j in range(3)] for i in range(3)]  # tensor axis order (d, h, w)
            i, j = a - 2, b - 2
            m[i][i], m[i][j], m[j][i], m[j][j] = c, s, -s, c
            rows.append(tuple(tuple(r[::-1]) for r in m[::-1]))  # (d, h, w) -> (w, h, d) on both sides
    return tuple(rows)


def turn_theta(plane: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """``affine_grid`` matrices (N, 3, 4) float32 of exact turns: ``turns[i]`` (1-3) x 90 degrees in plane ``plane[i]``.

    Integer entries; the same in normalised units (a quarter turn is drawn only in a square plane, a half turn is a
    negation)."""
    rot = _constant(_turn_table(), plane.device)[plane * 3 + turns - 1]  # (N, 3, 3)
    return torch.cat([rot, rot.new_zeros(rot.shape[0], 3, 1)], dim=2)


def grid_rotate(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """x (N, C, d, h, w) resampled on ``affine_grid(theta)`` (N, 3, 4), border padding; one ``grid_sample`` call.

    The grid in float32 whatever x's dtype: in bfloat16 voxel coordinates of 96+ voxels round by more than half a voxel.
    """
    grid = F.affine_grid(theta.float(), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False).to(x.dtype)


def resample_affine(x: torch.Tensor, theta: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """What ``grid_sample(x, affine_grid(theta), padding_mode="border", align_corners=False)`` gives for x
    (N, C, d, h, w), nearest-neighbour for the samples where ``nearest`` (N,) bool and trilinear elsewhere, computed
    voxel by voxel from theta (N, 3, 4); returns (N, C, d, h, w) in x's dtype.

    Each output voxel's source coordinate is an affine function of its index, so no (N, d, h, w, 3) grid is written
    and read back, and under ``torch.compile`` the coordinates, the eight gathers and their weights fuse into one
    kernel (two ``grid_sample`` calls and their grids cost most of a view's GPU time otherwise). Eager it is slower than
    ``grid_sample``: :func:`apply_rotation` uses it only while compiling. Rounding differs from ``grid_sample`` in the
    last bits of the trilinear weights; a nearest sample reads the same voxel (exact turns: bit for bit ``rot90``).
    """
    n, c, d, h, w = x.shape
    theta = theta.float().view(n, 3, 4, 1, 1, 1)

    def base(size: int) -> torch.Tensor:  # affine_grid's normalised voxel centres (align_corners=False)
        return (2 * torch.arange(size, device=x.device, dtype=torch.float32) + 1) / size - 1

    bx, by, bz = base(w).view(1, 1, 1, w), base(h).view(1, 1, h, 1), base(d).view(1, d, 1, 1)

    def source(row: int, size: int) -> torch.Tensor:  # (N, d, h, w) voxel coordinate along one axis, border-clipped
        g = theta[:, row, 0] * bx + theta[:, row, 1] * by + theta[:, row, 2] * bz + theta[:, row, 3]
        return (((g + 1) * size - 1) / 2).clamp(0, size - 1)

    ix, iy, iz = source(0, w), source(1, h), source(2, d)  # affine_grid's (x, y, z) = (w, h, d)
    flat = x.float().reshape(n, c, d * h * w)

    def at(zz: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = ((zz * h + yy) * w + xx).reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, index).view(n, c, d, h, w)

    near = at(iz.round().long(), iy.round().long(), ix.round().long())  # round half to even, as grid_sample does
    x0, y0, z0 = ix.floor(), iy.floor(), iz.floor()
    fx, fy, fz = (ix - x0)[:, None], (iy - y0)[:, None], (iz - z0)[:, None]
    x0, y0, z0 = x0.long(), y0.long(), z0.long()
    # a corner past the last voxel has weight 0 there (the coordinate was clipped to it): read the last voxel instead
    x1, y1, z1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1), (z0 + 1).clamp(max=d - 1)

    def lerp_x(zz: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return at(zz, yy, x0) * (1 - fx) + at(zz, yy, x1) * fx

    def lerp_xy(zz: torch.Tensor) -> torch.Tensor:
        return lerp_x(zz, y0) * (1 - fy) + lerp_x(zz, y1) * fy

    linear = lerp_xy(z0) * (1 - fz) + lerp_xy(z1) * fz
    return torch.where(_bcast(nearest), near, linear).to(x.dtype)


def rotate90_grid(x: torch.Tensor, plane: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Every sample turned ``turns[i]`` (1-3) x 90 degrees in plane ``plane[i]``, bit for bit what ``torch.rot90`` gives.

    One nearest-neighbour ``grid_sample`` with exact integer matrices (:func:`turn_theta`): each output voxel centre
    lands on an input voxel centre (up to rounding far below half a voxel), so values are copied, never interpolated.
    No host synchronisation. Odd turns in a plane with unequal sides are not checked here (:func:`draw_rotation` never
    draws them).
    """
    return grid_rotate(x, turn_theta(plane, turns), "nearest")


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """angles (N, 3) radians about the three axes -> (N, 3, 3) = Rz @ Ry @ Rx."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def free_theta(angles: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
    """``affine_grid`` matrices (N, 3, 4) float32 of rigid rotations (in voxel units) by ``angles`` (N, 3) radians about
    the w, h and d axes, about the centre of a (d, h, w) patch.

    ``affine_grid`` works in coordinates normalised by each side, so the rotation R (voxel units) is conjugated by the
    half sides S: theta = S^-1 R S. Without it a non-cubic patch would be sheared and scaled (a line along a long side
    shrinks when turned to a short one).
    """
    rot = _rotation_matrices(angles.float())
    d, h, w = spatial
    half = (w, h, d)  # affine_grid's (x, y, z) = (w, h, d)
    ratio = _constant(tuple(tuple(half[j] / half[i] for j in range(3)) for i in range(3)), angles.device)
    rot = rot * ratio  # (S^-1 R S)_ij = R_ij s_j / s_i
    return torch.cat([rot, rot.new_zeros(rot.shape[0], 3, 1)], dim=2)


def rotate_arbitrary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each sample rigidly (in voxel units) about its centre by ``angles`` (N, 3) radians (:func:`free_theta`),
    trilinear; one grid_sample call."""
    return grid_rotate(x, free_theta(angles, tuple(x.shape[2:])), "bilinear")


def draw_rotation(shape: torch.Size, gen: torch.Generator, device: torch.device) -> Params:
    """Rotation parameters of every sample of a batch of ``shape`` (N, C, d, h, w) (see the module docstring).

    Returns exact (N,) bool (an exact turn, else arbitrary angles), plane (N,) and turns (N,) int64 of the exact turn,
    angles (N, 3) radians of the arbitrary one (zero about the axes that do not turn), and both as ``affine_grid``
    matrices (N, 3, 4): turn_theta and free_theta (made here, eagerly, so a compiled blend pass holds no constants).
    """
    n = shape[0]
    exact = torch.rand(n, generator=gen, device=device) < 0.5
    plane = torch.randint(0, 3, (n,), generator=gen, device=device)
    turns = torch.randint(1, 4, (n,), generator=gen, device=device)
    unequal = torch.zeros(n, dtype=torch.bool, device=device)
    for p, (a, b) in enumerate(PLANES):  # the shape is known here: no device lookup table, no copy to the device
        if shape[a] != shape[b]:
            unequal |= plane == p
    turns = torch.where(unequal, 2, turns)  # a quarter turn would change the shape there
    on_axis = torch.rand(n, 3, generator=gen, device=device) < 0.5
    forced = torch.randint(0, 3, (n,), generator=gen, device=device)
    first = forced[:, None] == torch.arange(3, device=device)  # one-hot, without one_hot's range check
    on_axis = on_axis | (~on_axis.any(1, keepdim=True) & first)  # at least one axis turns
    angles = _uniform(gen, 3 * n, -math.pi / 6, math.pi / 6, device).view(n, 3) * on_axis
    return {"exact": exact, "plane": plane, "turns": turns, "angles": angles,
            "turn_theta": turn_theta(plane, turns), "free_theta": free_theta(angles, tuple(shape[2:]))}


def apply_rotation(x: torch.Tensor, params: Params, *, blend: bool) -> torch.Tensor:
    """Rotate sample i of x (N, C, d, h, w) by row i of ``params`` (:func:`draw_rotation`).

    blend: both kinds on every sample, kept per sample with ``torch.where`` (no synchronisation); else exact turns with
    ``rot90`` on their groups and arbitrary angles on the other samples only. Same values either way (on a GPU within
    float rounding of the arbitrary angles).
    """
    exact = params["exact"]
    if blend and torch.compiler.is_compiling():  # one fused kernel for both kinds (resample_affine)
        return resample_affine(x, torch.where(exact[:, None, None], params["turn_theta"], params["free_theta"]), exact)
    if blend:
        turned = grid_rotate(x, params["turn_theta"], "nearest")
        return torch.where(_bcast(exact), turned, grid_rotate(x, params["free_theta"], "bilinear"))
    out = rotate90(x, exact, params["plane"], params["turns"])
    free = (~exact).nonzero().squeeze(1)
    if free.numel():
        out.index_copy_(0, free, grid_rotate(x.index_select(0, free), params["free_theta"].index_select(0, free), "bilinear"))
    return out


def random_rotation(x: torch.Tensor, gen: torch.Generator, *, blend: bool = False) -> torch.Tensor:
    """Rotate every sample: half exact turns, half arbitrary angles (see the module docstring)."""
    return apply_rotation(x, draw_rotation(x.shape, gen, x.device), blend=blend)


def draw_colour(n: int, gen: torch.Generator, device: torch.device) -> Params:
    """Colour parameters of n samples: bright (N,) in units of the sample's std, contrast (N,), gamma (N,), order (N, 3)."""
    bright = _uniform(gen, n, -0.4, 0.4, device)
    contrast = _uniform(gen, n, 0.6, 1.4, device)
    gamma = _uniform(gen, n, 0.7, 1.5, device)
    order = torch.argsort(torch.rand(n, 3, generator=gen, device=device), dim=1)  # a random permutation per sample
    return {"bright": bright, "contrast": contrast, "gamma": gamma, "order": order}


def apply_colour(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Colour distortion of x (N, C, d, h, w) with :func:`draw_colour`'s parameters; the brightness shift scales with each sample's std."""
    std = x.std(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-6)
    bright = _bcast(params["bright"]) * std
    as_x = {k: _bcast(params[k]).to(x.dtype) for k in ("contrast", "gamma")}
    return colour_apply(x, bright.to(x.dtype), as_x["contrast"], as_x["gamma"], params["order"])


def colour_distort(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma in a random order per sample (parameters in the module docstring)."""
    return apply_colour(x, draw_colour(x.shape[0], gen, x.device))


def colour_apply(x: torch.Tensor, bright: torch.Tensor, contrast: torch.Tensor, gamma: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Apply brightness (+bright), contrast (about the current mean) and gamma (on min-max scaled values) to each
    sample in the order ``order[i]`` (a permutation of 0 = brightness, 1 = contrast, 2 = gamma); parameters (N, 1, 1, 1, 1).

    One pass for all samples and orders: a shift commutes with contrast and gamma, and gamma commutes with any
    positive affine map (min-max scaling undoes it), so every order equals ``c * (G - pivot) + pivot + bright``
    with G = gamma(x) and pivot the mean the contrast step sees: mean(x) if contrast comes before gamma, else mean(G).
    """
    dims = tuple(range(1, x.ndim))
    lo = x.amin(dim=dims, keepdim=True)
    rng = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-6)
    g = lo + rng * ((x - lo) / rng).clamp(0, 1) ** gamma
    position = order.argsort(dim=1)
    contrast_first = _bcast(position[:, 1] < position[:, 2])
    pivot = torch.where(contrast_first, x.mean(dim=dims, keepdim=True), g.mean(dim=dims, keepdim=True))
    return (g - pivot) * contrast + pivot + bright


def blur_matrices(sigma: torch.Tensor, size: int, radius: int = 3) -> torch.Tensor:
    """One axis of the Gaussian blur as matrices: (N, size, size) float32, entry [i, j, o] the weight of input voxel j
    in output voxel o of sample i (taps at -radius..radius with weights exp(-t^2 / 2 sigma_i^2), normalised; a tap past
    either end reads the end voxel: replicate padding, folded into the matrix)."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].float()) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 2r+1)
    pos = torch.arange(size, device=sigma.device)
    reads = (pos[:, None] + t.long()[None]).clamp(0, size - 1)  # (out, tap): the input voxel each tap reads
    taps = (reads[:, :, None] == pos).float()  # (out, tap, in)
    return torch.einsum("nt,otj->njo", k, taps)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur of x (N, C, d, h, w) with a per-sample sigma (N,), replicate padding.

    Each axis is one batched matrix product with :func:`blur_matrices` (a 1D blur with its padding is a banded matrix):
    a few fast GEMMs instead of grouped convolutions with one group per sample, which run slowly on GPUs and CPUs alike.
    """
    n, c, d, h, w = x.shape
    v = x.float()
    v = torch.bmm(v.reshape(n, c * d * h, w), blur_matrices(sigma, w, radius)).view(n, c, d, h, w)  # along w
    bh = blur_matrices(sigma, h, radius).transpose(1, 2)  # (N, out, in)
    v = torch.matmul(bh[:, None, None], v)  # along h: (N, 1, 1, h, h) @ (N, C, d, h, w)
    bd = blur_matrices(sigma, d, radius).transpose(1, 2)
    v = torch.bmm(bd, v.transpose(1, 2).reshape(n, d, c * h * w)).view(n, d, c, h, w).transpose(1, 2)  # along d
    return v.to(x.dtype).contiguous()


def _smooth(v: torch.Tensor, axis: int) -> torch.Tensor:
    """[1, 2, 1] along ``axis`` without padding (the axis shrinks by 2)."""
    size = v.shape[axis] - 2
    return v.narrow(axis, 0, size) + 2 * v.narrow(axis, 1, size) + v.narrow(axis, 2, size)


def _deriv(v: torch.Tensor, axis: int) -> torch.Tensor:
    """[-1, 0, 1] along ``axis`` without padding (the axis shrinks by 2)."""
    size = v.shape[axis] - 2
    return v.narrow(axis, 2, size) - v.narrow(axis, 0, size)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """3D Sobel gradient magnitude per channel, standardised per sample; constant input -> zeros.

    The three 3x3x3 Sobel kernels are separable (derivative along one axis, [1, 2, 1] along the other two): computed
    as shared 1D passes on the replicate-padded patch. The padding is concatenated edge slices, not ``F.pad``: under
    deterministic algorithms on CUDA ``F.pad(mode="replicate")`` takes a Python path torch.compile (2.11) cannot trace.
    """
    n, c = x.shape[:2]
    v = x.reshape(n * c, *x.shape[2:]).float()
    for axis in (1, 2, 3):  # replicate padding by one voxel: (N*C, d+2, h+2, w+2)
        v = torch.cat([v.narrow(axis, 0, 1), v, v.narrow(axis, v.shape[axis] - 1, 1)], dim=axis)
    sw = _smooth(v, 3)
    gd = _deriv(_smooth(sw, 2), 1)
    gh = _deriv(_smooth(sw, 1), 2)
    gw = _deriv(_smooth(_smooth(v, 1), 2), 3)
    mag = torch.sqrt(gd**2 + gh**2 + gw**2 + 1e-12).view_as(x)
    dims = tuple(range(1, x.ndim))
    mean, std = mag.mean(dim=dims, keepdim=True), mag.std(dim=dims, keepdim=True)
    return ((mag - mean) / (std + 1e-6)).to(x.dtype)


def draw_cutout(shape: torch.Size, gen: torch.Generator, device: torch.device) -> Params:
    """Cutout boxes of every sample of a batch of ``shape`` (N, C, d, h, w): start (N, 3) and stop (N, 3) voxel indices."""
    n = shape[0]
    starts, stops = [], []
    for size in shape[2:]:
        side = (_uniform(gen, n, 0.2, 0.5, device) * size).long().clamp_min(1)
        start = (torch.rand(n, generator=gen, device=device) * (size - side + 1).float()).long()
        starts.append(start)
        stops.append(start + side)
    return {"start": torch.stack(starts, 1), "stop": torch.stack(stops, 1)}


def apply_cutout(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Set the box [start, stop) of each sample of x (N, C, d, h, w) to the sample mean."""
    n, dev = x.shape[0], x.device
    mask = torch.ones(n, 1, 1, 1, 1, dtype=torch.bool, device=dev)
    for axis, size in enumerate(x.shape[2:]):
        pos = torch.arange(size, device=dev)
        inside = (pos[None] >= params["start"][:, axis, None]) & (pos[None] < params["stop"][:, axis, None])  # (N, size)
        shape = [n, 1, 1, 1, 1]
        shape[2 + axis] = size
        mask = mask & inside.view(shape)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.where(mask, mean, x)


def cutout(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Set one random box per sample (side 20-50 % of the patch) to the sample mean."""
    return apply_cutout(x, draw_cutout(x.shape, gen, x.device))


def draw_noise(shape: torch.Size, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> Params:
    """Noise of every sample of a batch of ``shape``: sigma (N,) in units of the sample's std, field (N, C, d, h, w) N(0, 1)."""
    sigma = _uniform(gen, shape[0], 0.0, 0.2, device)
    return {"sigma": sigma, "field": torch.randn(shape, generator=gen, device=device, dtype=dtype)}


def apply_noise(x: torch.Tensor, params: Params) -> torch.Tensor:
    """x (N, C, d, h, w) plus its noise field times sigma x the sample's std."""
    std = x.std(dim=tuple(range(1, x.ndim)), keepdim=True)
    return x + _bcast(params["sigma"]) * std * params["field"]


def draw_ops(n: int, augmentations: tuple[str, ...], gen: torch.Generator, device: torch.device, ops: int = 2) -> dict[str, torch.Tensor]:
    """Which transforms each of n views applies: ``min(ops, #options)`` different options per view, uniformly.

    Returns {name: (n,) bool} for every enabled option (identity included: it is drawn, and then does nothing).
    """
    unknown = sorted(set(augmentations) - set(OPTIONS))
    if unknown:
        raise ValueError(f"augmentations {','.join(unknown)}: choose from {','.join(OPTIONS)}")
    options = [name for name in OPTIONS if name in augmentations]
    if not options or ops < 1:
        return {name: torch.zeros(n, dtype=torch.bool, device=device) for name in options}
    keys = torch.rand(n, len(options), generator=gen, device=device)
    rank = keys.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per view; its first k options are drawn
    drawn = rank < min(ops, len(options))
    return {name: drawn[:, i] for i, name in enumerate(options)}


def draw_params(name: str, x: torch.Tensor, gen: torch.Generator) -> Params:
    """Random parameters of transform ``name`` for every sample of x (N, C, d, h, w); {} for those without any."""
    n, dev = x.shape[0], x.device
    if name == "rotate":
        return draw_rotation(x.shape, gen, dev)
    if name == "colour":
        return draw_colour(n, gen, dev)
    if name == "blur":
        return {"sigma": _uniform(gen, n, 0.5, 1.5, dev)}
    if name == "noise":
        return draw_noise(x.shape, gen, dev, x.dtype)
    if name == "cutout":
        return draw_cutout(x.shape, gen, dev)
    return {}


def apply_transform(name: str, x: torch.Tensor, params: Params, *, blend: bool) -> torch.Tensor:
    """Transform ``name`` of x (N, C, d, h, w), sample i with row i of ``params``; same shape and dtype."""
    if name == "rotate":
        return apply_rotation(x, params, blend=blend)
    if name == "colour":
        return apply_colour(x, params)
    if name == "blur":
        return gaussian_blur(x, params["sigma"])
    if name == "noise":
        return apply_noise(x, params)
    if name == "sobel":
        return sobel_magnitude(x)
    return apply_cutout(x, params)


View = tuple[dict[str, torch.Tensor], dict[str, Params]]  # (which transforms each sample applies, their parameters)


def draw_view(x: torch.Tensor, *, augmentations: tuple[str, ...], gen: torch.Generator, ops: int = 2) -> View:
    """Every random draw of one view of x (N, C, d, h, w), in the stream order of the module docstring.

    Returns (drawn, params): drawn {option: (N,) bool} (:func:`draw_ops`), params {transform: its parameters for all N
    samples} for every enabled transform, in :data:`ORDER`.
    """
    drawn = draw_ops(x.shape[0], augmentations, gen, x.device, ops)
    params = {name: draw_params(name, x, gen) for name in ORDER if name in drawn}  # for every sample, chosen or not
    return drawn, params


def blend_view(x: torch.Tensor, drawn: dict[str, torch.Tensor], params: dict[str, Params]) -> torch.Tensor:
    """The view of x (N, C, d, h, w) that :func:`draw_view`'s draws describe: each transform computed on every sample and
    kept where chosen. No host synchronisation and no data-dependent branch, so it can run through ``torch.compile``."""
    out = x
    for name in ORDER:
        if name in params:  # torch.where makes a new tensor: x is never written
            out = torch.where(_bcast(drawn[name]), apply_transform(name, out, params[name], blend=True), out)
    return out


def subset_view(x: torch.Tensor, drawn: dict[str, torch.Tensor], params: dict[str, Params]) -> torch.Tensor:
    """:func:`blend_view`'s view computed on the chosen samples of each transform only (``index_select``/``index_copy``):
    less arithmetic, one host synchronisation per transform."""
    out = x
    for name in ORDER:
        if name not in params:
            continue
        sel = drawn[name].nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        new = apply_transform(name, out.index_select(0, sel), {k: v.index_select(0, sel) for k, v in params[name].items()}, blend=False)
        if out is x:  # never write into the caller's tensor
            out = x.clone()
        out.index_copy_(0, sel, new)
    return out


def augment_view(x: torch.Tensor, *, augmentations: tuple[str, ...], gen: torch.Generator, ops: int = 2,
                 blend: bool | None = None) -> torch.Tensor:
    """One random composite augmentation per sample of x (N, C, d, h, w); same shape, dtype, device.

    Each sample draws ``ops`` different options from ``augmentations`` (identity among them); see the module docstring.
    ``blend``: apply each transform to every sample and keep it where chosen (no host synchronisation: the default off
    the CPU), or False to compute it on the chosen samples only (the default on the CPU). Both give the same views
    (bit for bit on the CPU, within float rounding on a GPU).
    """
    if blend is None:
        blend = x.device.type != "cpu"
    drawn, params = draw_view(x, augmentations=augmentations, gen=gen, ops=ops)
    return blend_view(x, drawn, params) if blend else subset_view(x, drawn, params)


class ViewAugmenter:
    """:func:`augment_view` for a training run, with the blend pass optionally through ``torch.compile``.

    The draws stay eager (the random stream is that of :func:`augment_view`); only :func:`blend_view` is compiled, as
    one graph (``fullgraph``): elementwise passes and reductions that inductor fuses, the rotation as one fused
    resampling (:func:`resample_affine`) and the blur's batched matrix products. Compiled code is kept per variant
    (patch shape, augmentation list, global state such as grad mode) and, by dynamo, per process: every augmenter of a
    process shares :data:`MAX_SHAPES` variants (a training run uses one). A compile failure, or a variant past that
    limit, falls back to the eager blend pass with a warning (``strict``: raises ConfigError instead); the views differ
    from eager ones by float rounding only.

    Args:
        compile: compile the blend pass (``runtime.compiling.compile_wanted`` decides it from ``--compile``).
    """

    MAX_SHAPES = 8

    def __init__(self, augmentations: tuple[str, ...], *, ops: int = 2, compile: bool = False, strict: bool = False) -> None:
        self.augmentations, self.ops, self.strict = augmentations, ops, strict
        self.compiled = compile
        self.compile_seconds = 0.0
        self._shapes: set[tuple[int, ...]] = set()
        # fullgraph: one graph or none (a graph break would compile the pieces apart, once per transform, and fuse little)
        self._fn = torch.compile(blend_view, dynamic=False, fullgraph=True) if compile else None

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One view of x (N, C, d, h, w), drawn from ``gen``."""
        drawn, params = draw_view(x, augmentations=self.augmentations, gen=gen, ops=self.ops)
        if not self.compiled:
            return blend_view(x, drawn, params) if x.device.type != "cpu" else subset_view(x, drawn, params)
        return self._compiled(x, drawn, params)

    def _compiled(self, x: torch.Tensor, drawn: dict[str, torch.Tensor], params: dict[str, Params]) -> torch.Tensor:
        import torch._dynamo.config as dynamo_config

        shape = tuple(x.shape)
        first = shape not in self._shapes
        t0 = time.perf_counter()
        try:
            with COMPILE_LOCK, dynamo_config.patch(recompile_limit=self.MAX_SHAPES, fail_on_recompile_limit_hit=True):
                out = self._fn(x, drawn, params)
        except Exception as exc:  # noqa: BLE001 - any compiler failure has the same remedy: the eager pass
            if is_out_of_memory(exc):
                raise
            if self.strict:
                raise ConfigError(f"--compile on: torch.compile of the SimCLR augmentation failed on {x.device} "
                                  f"({failure_reason(exc)}); use --compile off") from None
            log.warning("torch.compile of the SimCLR augmentation failed (%s); augmenting without it (--compile off avoids "
                        "the attempt)", failure_reason(exc))
            self.compiled = False
            return blend_view(x, drawn, params)  # the same draws: only the float rounding differs from a compiled view
        if first:
            self._shapes.add(shape)
            self.compile_seconds += time.perf_counter() - t0
            log.info("compiled the SimCLR augmentation for patches %s in %.1f s", "x".join(map(str, shape)), time.perf_counter() - t0)
        return out


def split_into_patches(volumes: torch.Tensor, k: int) -> torch.Tensor:
    """(M, C, D, H, W) -> (M*k^3, C, D/k, H/k, W/k): k^3 equal, non-overlapping patches per volume, volume-major."""
    m, c, d, h, w = volumes.shape
    pd, ph, pw = d // k, h // k, w // k
    v = volumes.view(m, c, k, pd, k, ph, k, pw)
    return v.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(m * k**3, c, pd, ph, pw)
