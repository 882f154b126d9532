"""Generated shape images of seed 004 (Ul Ala 2021, sections 3.1-3.2): one filled triangle,
circle or rectangle (3 classes), and the compound set (blank, one shape, or two different shapes:
7 classes), at a random position, size and rotation.

Images are grayscale uint8 (N, 1, S, S), white shapes on black, anti-aliased by 4x4
supersampling of an exact point-in-shape test (no drawing library). Deterministic given ``seed``:
the training and test sets come from independent generators, so the test set does not change with
``train_size`` and a smaller training set is a prefix of a larger one (seed 004 trains on 2700,
1350 and 500 images and tests on "the same 6000").

Every shape is drawn inside a bounding circle of radius R (pixels) around its centre:
circle of radius R; rectangle with its corners on that circle (aspect angle in [pi/8, 3pi/8],
i.e. side ratio between 0.41 and 2.4) and a random rotation; triangle with its vertices on the
circle at angles rot + (0, 2pi/3, 4pi/3), each jittered by up to 0.3 rad. Single images have
R in [0.2, 0.4] x S; compound images R in [0.14, 0.24] x S with the two bounding circles apart.

Background noise: every pixel gets uniform integer noise in [0, ``noise``] (default 8 of 255).
Without it a blank image is exactly constant, the conv stem maps it to a spatially constant
state, and the GroupNorm inside the ODE dynamics divides by a near-zero spread: measured local
Lipschitz constant of f about 100-150 on blank images against 3-7 on all others (width 16,
random init), so h * Lip is about 5-7 at the seed's step 0.05 and every implicit solve by
fixed-point iteration fails on batches holding a blank image. Noise of 8/255 brings blank
images to Lip 4-7 like the rest (``noise=0`` reproduces the failure).

Compound labels follow the seed (section 3.2): blank 0, circle 1, triangle 2, rectangle 3, and a
pair of labels a, b gets a + b + 1 (circle+triangle 4, circle+rectangle 5, triangle+rectangle 6).
"""

from __future__ import annotations

import numpy as np
import torch

from .data import TensorDataset
from .errors import ConfigError

SINGLE_CLASSES = ("triangle", "circle", "rectangle")
COMPOUND_CLASSES = ("blank", "circle", "triangle", "rectangle", "circle+triangle",
                    "circle+rectangle", "triangle+rectangle")
# seed 004's codes of the compound set's single shapes; a pair (a, b) is a + b + 1
SHAPE_CODE = {"circle": 1, "triangle": 2, "rectangle": 3}
SUPERSAMPLE = 4


def _inside(kind: str, X: np.ndarray, Y: np.ndarray, cx: float, cy: float, R: float,
            rng: np.random.Generator, rotate: bool = True) -> np.ndarray:
    """Boolean mask of the points (X, Y) (pixel units) inside a random ``kind`` shape; with
    ``rotate=False`` rectangles are axis-aligned and triangles point up (the random numbers
    drawn are the same either way)."""
    rot = rng.uniform(0.0, 2 * np.pi)
    if not rotate:
        rot = -np.pi / 2 if kind == "triangle" else 0.0
    dx, dy = X - cx, Y - cy
    if kind == "circle":
        return dx * dx + dy * dy <= R * R
    if kind == "rectangle":
        aspect = rng.uniform(np.pi / 8, 3 * np.pi / 8)
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = -dx * np.sin(rot) + dy * np.cos(rot)
        return (np.abs(u) <= R * np.cos(aspect)) & (np.abs(v) <= R * np.sin(aspect))
    angles = rot + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    vx, vy = cx + R * np.cos(angles), cy + R * np.sin(angles)
    # the point is inside when it lies on the same side of all three edges
    sides = [(vx[(i + 1) % 3] - vx[i]) * (Y - vy[i]) - (vy[(i + 1) % 3] - vy[i]) * (X - vx[i])
             for i in range(3)]
    return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | \
        ((sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0))


def _place(rng: np.random.Generator, size: int, radii: list[float]) -> list[tuple[float, float]]:
    """Centres keeping each bounding circle inside the image and apart from the others."""
    for _ in range(1000):
        centres = [tuple(rng.uniform(r + 0.5, size - r - 0.5, 2)) for r in radii]
        if all(np.hypot(a[0] - b[0], a[1] - b[1]) >= ra + rb + 1.0
               for i, (a, ra) in enumerate(zip(centres, radii))
               for b, rb in zip(centres[i + 1:], radii[i + 1:])):
            return centres
    raise ConfigError(f"could not place {len(radii)} shapes of radii "
                      f"{', '.join(f'{r:.1f}' for r in radii)} px apart in a {size}x{size} "
                      "image: lower dataset.radius")


def _render(kinds: list[tuple[str, ...]], size: int, r_range: tuple[float, float],
            rng: np.random.Generator, rotate: bool = True) -> np.ndarray:
    """uint8 (N, 1, size, size): image n shows the shapes ``kinds[n]``."""
    grid = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    X, Y = np.meshgrid(grid, grid)
    canvases = np.zeros((len(kinds),) + X.shape, dtype=bool)
    for canvas, shapes in zip(canvases, kinds):
        radii = [rng.uniform(*r_range) * size for _ in shapes]
        for kind, R, (cx, cy) in zip(shapes, radii, _place(rng, size, radii)):
            # only the supersampled points in the bounding circle's box need testing
            box = (slice(max(0, int((cy - R - 1) * SUPERSAMPLE)), int((cy + R + 1) * SUPERSAMPLE)),
                   slice(max(0, int((cx - R - 1) * SUPERSAMPLE)), int((cx + R + 1) * SUPERSAMPLE)))
            canvas[box] |= _inside(kind, X[box], Y[box], cx, cy, R, rng, rotate)
    hits = canvases.reshape(len(kinds), size, SUPERSAMPLE, size, SUPERSAMPLE).sum(axis=(2, 4),
                                                                                dtype=np.int32)
    return np.rint(hits * (255.0 / SUPERSAMPLE ** 2)).astype(np.uint8)[:, None]


def _check(train_size: int, test_size: int, image_size: int) -> None:
    if train_size <= 0 or test_size <= 0:
        raise ConfigError(f"dataset sizes must be positive, got {train_size}/{test_size}")
    if image_size < 12:
        raise ConfigError(f"dataset.shape.size must be at least 12 pixels, got {image_size}")


def _labels(rng: np.random.Generator, classes: int, n: int) -> np.ndarray:
    """Uniform labels from their own stream, so that the first k images do not depend on n."""
    return np.random.default_rng(rng.integers(2 ** 62)).integers(0, classes, n)


def _single_split(n: int, size: int, rng: np.random.Generator, radius: tuple[float, float],
                  rotate: bool):
    y = _labels(rng, len(SINGLE_CLASSES), n)
    x = _render([(SINGLE_CLASSES[k],) for k in y], size, radius, rng, rotate)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def _compound_split(n: int, size: int, rng: np.random.Generator, radius: tuple[float, float],
                    rotate: bool):
    by_label = {0: ()}
    names = list(SHAPE_CODE)
    for i, a in enumerate(names):
        by_label[SHAPE_CODE[a]] = (a,)
        for b in names[i + 1:]:
            by_label[SHAPE_CODE[a] + SHAPE_CODE[b] + 1] = (a, b)
    y = _labels(rng, len(COMPOUND_CLASSES), n)
    x = _render([by_label[int(k)] for k in y], size, radius, rng, rotate)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def _add_noise(x: torch.Tensor, noise: int, rng: np.random.Generator) -> torch.Tensor:
    """Add uniform integer noise in [0, noise] to every pixel (uint8, saturating at 255)."""
    if noise <= 0:
        return x
    grain = torch.from_numpy(rng.integers(0, noise + 1, tuple(x.shape), dtype=np.int16))
    return (x.to(torch.int16) + grain).clamp_(max=255).to(torch.uint8)


def _radius(radius, largest: float) -> tuple[float, float]:
    """``dataset.radius`` as (low, high) fractions of the image side, checked."""
    try:
        lo, hi = (float(r) for r in radius)
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.radius must be two numbers [low, high], got {radius!r}") \
            from None
    if not 0.05 <= lo <= hi <= largest:
        raise ConfigError(f"dataset.radius must satisfy 0.05 <= low <= high <= {largest:g} "
                          f"(fractions of the image side), got [{lo:g}, {hi:g}]")
    return lo, hi


def _build(name: str, split, classes: int, train_size: int, test_size: int, image_size: int,
           seed: int, noise: int, radius: tuple[float, float], rotate: bool) -> TensorDataset:
    _check(train_size, test_size, image_size)
    if noise < 0 or noise > 255:
        raise ConfigError(f"dataset.noise must be in [0, 255], got {noise}")
    if not isinstance(rotate, bool):
        raise ConfigError(f"dataset.rotate must be true or false, got {rotate!r}")
    tx, ty = split(train_size, image_size, np.random.default_rng([seed, 0]), radius, rotate)
    vx, vy = split(test_size, image_size, np.random.default_rng([seed, 1]), radius, rotate)
    tx = _add_noise(tx, noise, np.random.default_rng([seed, 0, 1]))
    vx = _add_noise(vx, noise, np.random.default_rng([seed, 1, 1]))
    return TensorDataset(name, tx, ty, vx, vy, num_classes=classes, augment=False)


def shapes(train_size: int = 2700, test_size: int = 6000, image_size: int = 28, seed: int = 0,
           noise: int = 8, radius=(0.2, 0.4), rotate: bool = True, **_: object) -> TensorDataset:
    """Seed 004's single shapes: labels 0 triangle, 1 circle, 2 rectangle (uniform); images
    uint8 (N, 1, S, S). ``radius``: the bounding circle's radius range as fractions of the side
    S (at most 0.45); ``rotate``: random rotation (else axis-aligned rectangles, upright
    triangles). Raises ConfigError for invalid sizes, noise, radius or rotate."""
    return _build("shapes", _single_split, len(SINGLE_CLASSES), train_size, test_size,
                  image_size, seed, noise, _radius(radius, 0.45), rotate)


def shapes_compound(train_size: int = 2700, test_size: int = 6000, image_size: int = 28,
                    seed: int = 0, noise: int = 8, radius=(0.14, 0.24), rotate: bool = True,
                    **_: object) -> TensorDataset:
    """Seed 004's compound shapes, 7 classes (uniform): see COMPOUND_CLASSES for the labels.
    ``radius`` (at most 0.25 of the side, so that two shapes fit apart) and ``rotate`` as in
    :func:`shapes`."""
    return _build("shapes_compound", _compound_split, len(COMPOUND_CLASSES), train_size,
                  test_size, image_size, seed, noise, _radius(radius, 0.25), rotate)
