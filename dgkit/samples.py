"""An embedded sample dataset, drawn on the fly: 6 shapes x 4 domains, no download, no licence.

`dgkit samples make DIR` writes `DIR/<domain>/<class>/<n>.png`. The domains differ the way PACS'
do: `photo` (shaded, lit, on a textured background), `cartoon` (flat fill, thick outline),
`sketch` (pencil strokes on paper grain, no fill) and `painting` (brush-textured colour blobs).
Position, scale, rotation and colour are random within each domain. Image `n` of a domain and
class depends only on (seed, domain, class, n): the same seed gives byte-identical files (with
the same numpy and Pillow), and `--per-class 10` draws the first 10 images of `--per-class 60`.

`--shortcut P` builds a world where ERM fails: every image gets a coloured mark in its top-left
corner whose colour is its class's with probability P (another class's otherwise) in every domain
but `--shortcut-free` (sketch), where the colour is random. A student that reads the mark is
right on P of the source images and at chance on the held-out domain; the shape is the only cue
that transfers.

Imported at every CLI start, so only typer and the standard library are imported at the top;
numpy and PIL are imported inside the functions.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dgkit.errors import DgkitError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

CLASSES = ("arrow", "circle", "heart", "square", "star", "triangle")
DOMAINS = ("cartoon", "painting", "photo", "sketch")
FORMAT = 1  # bump when the drawings change, so cached copies are known to differ
SUPERSAMPLE = 2  # drawn at 2x and downsampled: anti-aliased edges
MANIFEST = "samples.json"
# The shortcut mark's colour per class (in CLASSES order): far apart in hue and brightness.
CUE_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
               (70, 240, 240))
CUE_SIZE = 0.22  # the mark's side as a fraction of the image side


# ---------------------------------------------------------------- geometry

def _rng(seed: int, domain: str, cls: str, index: int) -> np.random.Generator:
    import numpy as np

    key = f"dgkit-samples:{FORMAT}:{seed}:{domain}:{cls}:{index}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def _outline(cls: str) -> np.ndarray:
    """The shape's closed outline in unit coordinates (about radius 1, y down), [N, 2]."""
    import numpy as np

    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    if cls == "circle":
        pts = np.stack([np.cos(t), np.sin(t)], 1) * 0.9
    elif cls == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.72
    elif cls == "triangle":
        a = np.radians([-90, 30, 150])
        pts = np.stack([np.cos(a), np.sin(a) + 0.15], 1)
    elif cls == "star":
        a = np.radians(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(a), r * np.sin(a) + 0.08], 1)
    elif cls == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 16.5
    elif cls == "arrow":
        pts = np.array([[-1, -0.2], [0.15, -0.2], [0.15, -0.58], [1, 0], [0.15, 0.58],
                        [0.15, 0.2], [-1, 0.2]])
    else:
        raise DgkitError(f"unknown sample class '{cls}'; the classes are {', '.join(CLASSES)}")
    return pts.astype(np.float64)


def _densify(pts: np.ndarray, step: float) -> np.ndarray:
    """Points every `step` units along the closed outline (so strokes can wobble)."""
    import numpy as np

    closed = np.vstack([pts, pts[:1]])
    out = []
    for a, b in zip(closed[:-1], closed[1:], strict=True):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * (np.arange(n)[:, None] / n))
    return np.vstack(out)


def _place(cls: str, rng: np.random.Generator, canvas: int) -> tuple[np.ndarray, float]:
    """Outline in canvas pixels at a random scale, rotation and position; and its radius."""
    import numpy as np

    radius = canvas * rng.uniform(0.24, 0.38)
    angle = rng.uniform(-35, 35) if cls == "heart" else rng.uniform(-180, 180)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pts = _outline(cls) @ np.array([[c, s], [-s, c]]) * radius
    lo, hi = pts.min(0), pts.max(0)
    margin = canvas * 0.04
    centre = [rng.uniform(margin - lo[i], canvas - margin - hi[i]) for i in range(2)]
    return pts + np.array(centre), radius


def _mask(pts: np.ndarray, canvas: int) -> np.ndarray:
    """Filled polygon as float [H, W] in {0, 1}."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float [H, W] array, done at a quarter of the resolution (the blurred
    fields are smooth) with one kernel matrix applied to rows and columns."""
    import numpy as np
    from PIL import Image

    size = a.shape[0]
    small = max(8, size // 4)
    low = np.asarray(Image.fromarray(a.astype(np.float32), "F")
                     .resize((small, small), Image.Resampling.BOX), np.float64)
    i = np.arange(small, dtype=np.float64)
    s = max(sigma * small / size, 0.3)
    kernel = np.exp(-0.5 * ((i[:, None] - i[None, :]) / s) ** 2)
    kernel /= kernel.sum(1, keepdims=True)
    low = (kernel @ low @ kernel.T).astype(np.float32)
    return np.asarray(Image.fromarray(low, "F").resize((size, size), Image.Resampling.BICUBIC))


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    import numpy as np

    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _noise(rng: np.random.Generator, canvas: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a random grid of `cells` (rows, columns) upsampled."""
    import numpy as np
    from PIL import Image

    grid = rng.uniform(0, 1, cells).astype(np.float32)
    img = Image.fromarray(grid, "F").resize((canvas, canvas), Image.Resampling.BICUBIC)
    return np.asarray(img) * 2 - 1


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import numpy as np

    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)),
                    np.float32)


def _to_image(rgb: np.ndarray) -> Image.Image:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- the four styles

def _photo(cls: str, rng: np.random.Generator, canvas: int) -> Image.Image:
    """A lit, shaded object with a soft shadow on a wood, stone or cloth texture."""
    import numpy as np

    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
    light = rng.uniform(0, 2 * np.pi)  # direction the light comes from, in the image plane
    lx, ly = math.cos(light), math.sin(light)
    # Background: a material texture, lit brighter on the side the light comes from.
    base = _hsv(rng.uniform(0.05, 0.15) if rng.random() < 0.5 else rng.uniform(0, 1),
                rng.uniform(0.1, 0.45), rng.uniform(0.45, 0.8))
    kind = rng.integers(3)
    if kind == 0:  # wood: long streaks
        tex = 0.6 * _noise(rng, canvas, (48, 3)) + 0.4 * _noise(rng, canvas, (160, 6))
        if rng.random() < 0.5:
            tex = tex.T
    elif kind == 1:  # stone: blotches at two scales
        tex = 0.6 * _noise(rng, canvas, (5, 5)) + 0.4 * _noise(rng, canvas, (24, 24))
    else:  # cloth: a fine weave
        f = rng.uniform(0.9, 1.4) * canvas / 4
        tex = 0.5 * np.sin(xx * f) * np.sin(yy * f) + 0.5 * _noise(rng, canvas, (8, 8))
    shade = 1 + 0.25 * ((xx - 0.5) * lx + (yy - 0.5) * ly)
    bg = base[None, None] * (1 + 0.18 * tex[..., None]) * shade[..., None]

    pts, radius = _place(cls, rng, canvas)
    mask = _mask(pts, canvas)
    # Soft shadow, cast away from the light.
    off = radius * rng.uniform(0.08, 0.2)
    shadow = _blur(_shift(mask, int(-lx * off), int(-ly * off)), radius * 0.12)
    bg = bg * (1 - 0.55 * shadow[..., None])
    # The object: a bevelled height field lit from `light` (Lambert plus a specular highlight).
    height = _blur(mask, radius * rng.uniform(0.1, 0.22))
    gy, gx = np.gradient(height * radius * 0.5)
    normal = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    to_light = np.array([lx, ly, 0.9], np.float32)
    to_light /= np.linalg.norm(to_light)
    diffuse = np.clip(normal @ to_light, 0, 1)
    half = to_light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    specular = np.clip(normal @ half, 0, 1) ** rng.uniform(20, 60) * rng.uniform(0.3, 0.7)
    colour = _hsv(rng.uniform(0, 1), rng.uniform(0.45, 0.95), rng.uniform(0.55, 0.95))
    obj = colour[None, None] * (0.3 + 0.8 * diffuse[..., None]) + specular[..., None]
    obj = obj * (1 + 0.04 * _noise(rng, canvas, (32, 32))[..., None])  # surface texture
    img = bg * (1 - mask[..., None]) + obj * mask[..., None]
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)  # sensor noise
    return _to_image(img)


def _cartoon(cls: str, rng: np.random.Generator, canvas: int) -> Image.Image:
    """Flat colours, cel shading, a glossy highlight and a thick dark outline."""
    import numpy as np
    from PIL import ImageDraw

    bg = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.9, 1.0))
    img = np.broadcast_to(bg, (canvas, canvas, 3)).copy()
    pts, radius = _place(cls, rng, canvas)
    if rng.random() < 0.6:  # a flat ground shadow under the shape
        cx, cy = pts.mean(0)
        bottom = pts[:, 1].max()
        w, h = radius * rng.uniform(0.8, 1.1), radius * 0.15
        yy, xx = np.mgrid[0:canvas, 0:canvas]
        ground = ((xx - cx) / w) ** 2 + ((yy - min(bottom, canvas - h)) / h) ** 2 < 1
        img[ground] = bg * 0.82
    mask = _mask(pts, canvas)
    hue = rng.uniform(0, 1)
    fill = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0))
    d = int(radius * 0.18)
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = int(d * math.cos(angle)), int(d * math.sin(angle))
    cel = mask * (1 - _shift(mask, dx, dy))  # the band facing away from the light
    flat = np.where(cel[..., None] > 0.5, fill * 0.75, fill)
    highlight = mask * _shift(_shift(mask, -dx, -dy) * (1 - _shift(mask, -2 * dx, -2 * dy)),
                              -dx // 2, -dy // 2)
    flat = np.where(highlight[..., None] > 0.5, 0.55 + 0.45 * fill, flat)
    img = img * (1 - mask[..., None]) + flat * mask[..., None]
    out = _to_image(img)
    ink = tuple(int(v * 255) for v in _hsv(hue, 0.6, rng.uniform(0.0, 0.25)))
    width = max(2, int(radius * rng.uniform(0.07, 0.11)))
    loop = [tuple(p) for p in np.vstack([pts, pts[:2]])]
    ImageDraw.Draw(out).line(loop, fill=ink, width=width, joint="curve")
    return out


def _sketch(cls: str, rng: np.random.Generator, canvas: int) -> Image.Image:
    """Wobbly graphite strokes, a little hatching and stray guide lines on grainy paper."""
    import numpy as np
    from PIL import Image, ImageDraw

    paper = _hsv(rng.uniform(0.08, 0.15), rng.uniform(0.0, 0.08), rng.uniform(0.9, 0.99))
    grain = (0.5 * rng.normal(0, 1, (canvas, canvas)) + 0.5 * _noise(rng, canvas, (64, 64)))
    pts, radius = _place(cls, rng, canvas)
    ink = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(ink)
    width = max(1, int(canvas / 128 * rng.uniform(0.8, 1.6)))
    dense = _densify(pts, radius * 0.05)
    n = len(dense)
    for _ in range(int(rng.integers(2, 4))):  # a few passes, each wobbling its own way
        wobble = np.stack([np.interp(np.arange(n), np.linspace(0, n, 8),
                                     rng.normal(0, radius * 0.03, 8)) for _ in range(2)], 1)
        start = int(rng.integers(n))
        order = (start + np.arange(n + int(rng.integers(0, n // 8 + 1)))) % n  # overshoot
        stroke = dense[order] + wobble[order] + rng.normal(0, radius * 0.01, 2)
        draw.line([tuple(p) for p in stroke], fill=int(rng.uniform(150, 255)), width=width)
    if rng.random() < 0.5:  # hatching on the side away from the light, clipped to the shape
        hatch = Image.new("L", (canvas, canvas), 0)
        hd = ImageDraw.Draw(hatch)
        a = rng.uniform(0, np.pi)
        ux, uy = math.cos(a), math.sin(a)
        spacing = max(3, radius * 0.1)
        for k in np.arange(-canvas, canvas, spacing):
            cx, cy = canvas / 2 - uy * k, canvas / 2 + ux * k
            hd.line([(cx - ux * canvas, cy - uy * canvas), (cx + ux * canvas, cy + uy * canvas)],
                    fill=int(rng.uniform(60, 130)), width=max(1, width - 1))
        mask = _mask(pts, canvas)
        d = int(radius * 0.35)
        b = rng.uniform(0, 2 * np.pi)
        band = mask * (1 - _shift(mask, int(d * math.cos(b)), int(d * math.sin(b))))
        ink = Image.fromarray(np.maximum(np.asarray(ink), np.asarray(hatch) * band)
                              .astype(np.uint8))
        draw = ImageDraw.Draw(ink)
    for _ in range(int(rng.integers(0, 3))):  # faint construction lines
        p, q = rng.uniform(0, canvas, 2), rng.uniform(0, canvas, 2)
        draw.line([tuple(p), tuple(q)], fill=int(rng.uniform(25, 60)), width=1)
    graphite = np.asarray(ink, np.float32) / 255 * (0.75 + 0.25 * np.clip(grain, -1, 1))
    lead = rng.uniform(0.15, 0.4)  # how dark the pencil is
    img = paper[None, None] * (1 + 0.03 * grain[..., None])
    img = img * (1 - (1 - lead) * np.clip(graphite, 0, 1)[..., None])
    return _to_image(img)


_ROUND = [(math.cos(2 * math.pi * k / 14), math.sin(2 * math.pi * k / 14)) for k in range(14)]


def _dabs(draw: Any, centres: np.ndarray, lengths: np.ndarray, widths: np.ndarray,
          angles: np.ndarray, colours: np.ndarray) -> None:
    """Rounded brush marks (ellipse polygons), one per row of the arguments."""
    for (x, y), ln, w, a, colour in zip(centres, lengths, widths, angles, colours, strict=True):
        c, s = math.cos(a), math.sin(a)
        draw.polygon([(x + c * ln * u - s * w * v, y + s * ln * u + c * w * v) for u, v in _ROUND],
                     fill=tuple(int(k) for k in colour))


def _paints(rng: np.random.Generator, n: int, hsv: tuple[float, float, float],
            spread: tuple[float, float, float]) -> np.ndarray:
    """n colours scattered around `hsv`, as uint8 RGB rows."""
    import numpy as np

    jitter = np.asarray(hsv) + rng.normal(0, 1, (n, 3)) * np.asarray(spread)
    return np.array([_hsv(*row) * 255 for row in jitter]).astype(np.uint8)


def _painting(cls: str, rng: np.random.Generator, canvas: int) -> Image.Image:
    """Blobs and dabs of related colours, brush streaks, on canvas weave."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    back = (rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.45, 0.9))
    out = Image.new("RGB", (canvas, canvas), tuple(int(c) for c in _hsv(*back) * 255))
    for size, n in ((0.3, 10), (0.16, 24)):  # broad washes, then smaller strokes
        length = canvas * size
        _dabs(ImageDraw.Draw(out), rng.uniform(-0.1, 1.1, (n, 2)) * canvas,
              length * rng.uniform(0.7, 1.3, n), length * rng.uniform(0.25, 0.5, n),
              rng.uniform(0, np.pi, n), _paints(rng, n, back, (0.07, 0.12, 0.12)))
        out = out.filter(ImageFilter.GaussianBlur(length / 12))
    pts, radius = _place(cls, rng, canvas)
    fore = ((back[0] + rng.uniform(0.25, 0.75)) % 1.0,  # a hue that stands out
            rng.uniform(0.5, 0.95), rng.uniform(0.55, 0.95))
    draw = ImageDraw.Draw(out)
    draw.polygon([tuple(p) for p in pts], fill=tuple(int(c) for c in _hsv(*fore) * 255))
    ys, xs = np.nonzero(_mask(pts, canvas) > 0.5)
    direction = rng.uniform(0, np.pi)
    dab = radius * rng.uniform(0.09, 0.14)
    n = min(len(xs), 200)
    pick = rng.choice(len(xs), size=n, replace=True)
    centres = np.stack([xs[pick], ys[pick]], 1) + rng.normal(0, dab * 0.15, (n, 2))
    _dabs(draw, centres, dab * rng.uniform(0.6, 1.0, n), dab * rng.uniform(0.25, 0.4, n),
          direction + rng.normal(0, 0.3, n), _paints(rng, n, fore, (0.03, 0.12, 0.12)))
    streaks = _noise(rng, canvas, (6, 48))  # bristle marks along the brush direction
    streaks = np.asarray(Image.fromarray(streaks, "F").rotate(
        math.degrees(-direction), Image.Resampling.BICUBIC, expand=False, fillcolor=0))
    yy, xx = np.mgrid[0:canvas, 0:canvas]
    weave = np.sin(xx * 2.2) * np.sin(yy * 2.2)  # canvas texture
    img = np.asarray(out, np.float32) / 255 * (1 + 0.05 * streaks[..., None])
    img = np.asarray(_to_image(img).filter(ImageFilter.GaussianBlur(canvas / 250)), np.float32)
    return _to_image(img / 255 * (1 + 0.03 * weave[..., None]))


STYLES = {"cartoon": _cartoon, "painting": _painting, "photo": _photo, "sketch": _sketch}


def draw_sample(domain: str, cls: str, index: int, seed: int = 0, size: int = 128,
                cue: int | None = None) -> Image.Image:
    """Image `index` of (`domain`, `cls`): size x size RGB, a pure function of its arguments;
    with `cue`, the top-left mark in CUE_COLOURS[cue]."""
    from PIL import Image, ImageDraw

    if domain not in STYLES:
        raise DgkitError(f"unknown sample domain '{domain}'; the domains are "
                         f"{', '.join(DOMAINS)}")
    canvas = size * SUPERSAMPLE
    img = STYLES[domain](cls, _rng(seed, domain, cls, index), canvas)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if cue is not None:
        side = max(2, round(CUE_SIZE * size))
        ImageDraw.Draw(img).rectangle([0, 0, side - 1, side - 1], fill=CUE_COLOURS[cue])
    return img


def cue_of(domain: str, cls: str, index: int, seed: int, shortcut: float, free: str) -> int:
    """The mark's class colour: the image's own class with probability `shortcut` outside the
    shortcut-free domain (another class, uniformly, otherwise); uniform in that domain."""
    rng = _rng(seed, f"cue:{domain}", cls, index)
    own = CLASSES.index(cls)
    if domain == free:
        return int(rng.integers(len(CLASSES)))
    if rng.random() < shortcut:
        return own
    return int((own + 1 + rng.integers(len(CLASSES) - 1)) % len(CLASSES))


# ---------------------------------------------------------------- writing the folder

def make_samples(root: str | Path, seed: int = 0, per_class: int = 60, size: int = 128,
                 overwrite: bool = False, quiet: bool = False, shortcut: float | None = None,
                 shortcut_free: str = "sketch") -> Path:
    """Write `root/<domain>/<class>/<n>.png` and `root/samples.json`; return `root`.

    The images are drawn into a temporary folder beside `root` and moved in at the end, so an
    interrupted run leaves no half-made dataset; --overwrite replaces everything in `root`.
    """
    from dgkit.progress import track

    root = Path(root).expanduser()
    if per_class < 1:
        raise DgkitError(f"--per-class must be at least 1, got {per_class}")
    if not 16 <= size <= 1024:
        raise DgkitError(f"--size must be between 16 and 1024 pixels, got {size}")
    if shortcut is not None and not 0.0 <= shortcut <= 1.0:
        raise DgkitError(f"--shortcut must be between 0 and 1, got {shortcut}")
    if shortcut_free not in DOMAINS:
        raise DgkitError(f"--shortcut-free '{shortcut_free}' is not one of the domains: "
                         f"{', '.join(DOMAINS)}")
    if root.exists() and not root.is_dir():
        raise DgkitError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise DgkitError(f"{root} is not empty; pass --overwrite to replace it, or another "
                         "folder")
    real = root.resolve()  # so that "." has a name and a parent
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = real.with_name(f".{real.name}.partial-{os.getpid()}")
    old = real.with_name(f".{real.name}.replaced-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    jobs = [(d, c, n) for d in DOMAINS for c in CLASSES for n in range(per_class)]
    try:
        for d in DOMAINS:
            for c in CLASSES:
                (tmp / d / c).mkdir(parents=True)
        width = len(str(per_class - 1))
        label = None if quiet else f"Drawing {len(jobs)} sample images"
        for d, c, n in track(jobs, len(jobs), label):
            cue = None if shortcut is None else cue_of(d, c, n, seed, shortcut, shortcut_free)
            draw_sample(d, c, n, seed, size, cue).save(tmp / d / c / f"{n:0{width}d}.png")
        manifest = {"generator": "dgkit.samples", "format": FORMAT, "seed": seed,
                    "per_class": per_class, "size": size, "domains": list(DOMAINS),
                    "classes": list(CLASSES)}
        if shortcut is not None:
            manifest["shortcut"] = {"probability": shortcut, "free_domain": shortcut_free,
                                    "mark": "top-left square", "size": CUE_SIZE,
                                    "colours": dict(zip(CLASSES, CUE_COLOURS, strict=True))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        # Move the new files in (the folder itself stays: the user's shell may be in it).
        real.mkdir(exist_ok=True)
        old.mkdir()
        for child in list(real.iterdir()):  # only with --overwrite
            os.replace(child, old / child.name)
        for child in list(tmp.iterdir()):
            os.replace(child, real / child.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def contact_sheet(root: str | Path, per_row: int = 8) -> Image.Image:
    """One row per (domain, class) with its first `per_row` images: for a quick look."""
    from PIL import Image

    root = Path(root)
    rows = [sorted((root / d / c).glob("*.png"))[:per_row] for d in DOMAINS for c in CLASSES]
    rows = [r for r in rows if r]
    if not rows:
        raise DgkitError(f"{root} holds no sample images")
    size = Image.open(rows[0][0]).width
    sheet = Image.new("RGB", (per_row * size, len(rows) * size), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, path in enumerate(row):
            sheet.paste(Image.open(path).convert("RGB"), (x * size, y * size))
    return sheet


# ---------------------------------------------------------------- CLI

samples_app = typer.Typer(help="The built-in sample dataset: 6 shapes in 4 domains, drawn "
                               "on the fly.", no_args_is_help=True)


@samples_app.command("make")
def make(
    folder: Annotated[Path, typer.Argument(help="Where to write <domain>/<class>/<n>.png.")],
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical images.")] = 0,
    per_class: Annotated[int, typer.Option(help="Images per class and domain.")] = 60,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty FOLDER.")] = False,
    shortcut: Annotated[float | None, typer.Option(
        help="Add a corner mark whose colour names the class with this probability in every "
             "domain but --shortcut-free, where it is random: a world where ERM fails.")
    ] = None,
    shortcut_free: Annotated[str, typer.Option(
        help="The domain whose mark is random (hold it out with --target).")] = "sketch",
    sheet: Annotated[Path | None, typer.Option(
        help="Also save a contact sheet PNG (first 8 images of each domain and class).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Draw the sample dataset: arrow, circle, heart, square, star, triangle in the cartoon,
    painting, photo and sketch domains."""
    from dgkit.progress import console

    root = make_samples(folder, seed=seed, per_class=per_class, size=size, overwrite=overwrite,
                        quiet=quiet, shortcut=shortcut, shortcut_free=shortcut_free)
    if sheet is not None:
        contact_sheet(root).save(sheet)
    total = per_class * len(CLASSES) * len(DOMAINS)
    console.print(f"wrote {total} images to {root} ({len(DOMAINS)} domains x {len(CLASSES)} "
                  f"classes x {per_class}, {size} px, seed {seed})")
    target = shortcut_free if shortcut is not None else "sketch"
    console.print(f"next: dgkit distill --data {root} --target {target}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(samples_app, name="samples")
