"""A procedural dataset of coloured shapes with exact captions, and the checker that reads them back.

Each image is one shape on a black background: shape x colour x size x position, with a little
jitter of position and size. Because the generator knows the truth, a generated image can be
checked exactly: ``check`` segments the largest bright component and reads its shape (fill ratio
of its bounding box and where its mass sits), colour (nearest palette entry of its core pixels),
size (extent) and position (nearest cell centre). On the generator's own images it is right on
every attribute (tested), so its verdict on a model's images measures prompt adherence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "purple": (150, 60, 200),
}
SIZES = {"small": 0.25, "large": 0.42}  # extent as a fraction of the image side
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
ATTRIBUTES = ("shape", "colour", "size", "position")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    def as_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


def all_specs() -> list[ShapeSpec]:
    return [ShapeSpec(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]


def parse_caption(caption: str) -> ShapeSpec | None:
    """The spec a caption names, or None when it is not a shapes caption."""
    words = caption.lower().replace(",", " ").split()
    found = {}
    for attr, names in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
        hits = [w for w in words if w in names]
        if len(hits) != 1:
            return None
        found[attr] = hits[0]
    vertical = [w for w in words if w in ("top", "bottom")]
    horizontal = [w for w in words if w in ("left", "right")]
    if "center" in words or "centre" in words:
        if vertical or horizontal:
            return None
        found["position"] = "center"
    elif len(vertical) == 1 and len(horizontal) == 1:
        found["position"] = f"{vertical[0]} {horizontal[0]}"
    else:
        return None
    return ShapeSpec(**found)


def render(spec: ShapeSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB image (size, size, 3) uint8, drawn at 4x and downsampled for anti-aliased edges."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    extent = SIZES[spec.size] * (1.0 + rng.uniform(-0.08, 0.08)) * big
    cx, cy = POSITIONS[spec.position]
    cx = (cx + rng.uniform(-0.035, 0.035)) * big
    cy = (cy + rng.uniform(-0.035, 0.035)) * big
    h = extent / 2
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    colour = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif spec.shape == "square":
        s = h * 0.89  # equal area to the circle, roughly, so size words mean the same for all shapes
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif spec.shape == "triangle":  # apex up
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=colour)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def generate(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[ShapeSpec]]:
    """``count`` images cycling through every combination in a seeded order: (N, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    specs = all_specs()
    chosen = []
    while len(chosen) < count:
        chosen.extend(specs[i] for i in rng.permutation(len(specs)))
    chosen = chosen[:count]
    images = np.stack([render(s, size, rng) for s in chosen]) if chosen else np.zeros((0, size, size, 3), np.uint8)
    return images, chosen


def check(image: np.ndarray) -> dict | None:
    """Read shape, colour, size and position off one RGB image (H, W, 3) uint8; None if no shape is found."""
    from scipy import ndimage

    img = image.astype(np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError("check() needs an RGB image (H, W, 3)")
    side = img.shape[0]
    bright = img.max(axis=2)
    mask = bright > 70
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    comp = labels == (int(np.argmax(sizes)) + 1)
    area = comp.sum()
    if area < max(2, side * side // 400):
        return None
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    w, h = x1 - x0, y1 - y0
    # sub-pixel coverage: anti-aliased edge pixels count by their brightness, so small shapes still read right
    cover = np.clip(bright[y0:y1, x0:x1] / max(1.0, np.percentile(bright[comp], 90)), 0, 1) * comp[y0:y1, x0:x1]
    w_eff, h_eff = cover.max(axis=0).sum(), cover.max(axis=1).sum()  # extents counting partial edge pixels
    fill = cover.sum() / max(w_eff * h_eff, 1e-6)
    rows = np.arange(h)[:, None] + 0.5
    mass_y = (cover * rows).sum() / max(cover.sum(), 1e-6) / h  # 0.5 symmetric; ~0.67 for an apex-up triangle
    if fill > 0.88:
        shape = "square"
    elif fill > 0.64:
        shape = "circle"
    elif mass_y > 0.585:
        shape = "triangle"
    else:
        shape = "diamond"
    core = comp & (bright >= np.percentile(bright[comp], 50))
    mean = img[core].mean(axis=0)
    colour = min(COLOURS, key=lambda c: float(((np.asarray(COLOURS[c]) - mean) ** 2).sum()))
    extent = max(w, h) / side
    size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    cy, cx = (ys.mean() + 0.5) / side, (xs.mean() + 0.5) / side
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return {"shape": shape, "colour": colour, "size": size, "position": position}
