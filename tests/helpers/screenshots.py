"""Screenshots of a page in headless Chromium, and a comparison of two that forgives fonts.

``screenshot(page, out)`` renders a local HTML file at the width given and at the height of
its whole document (measured in the browser first), so a blank tail would show. ``thumbnail``
averages the picture over BLOCK x BLOCK pixel blocks (what the reference PNG holds: small, and
still a picture of the page). ``difference`` compares two thumbnails by their colour only
(each channel above the block's grey): text is black and grey, so another font or hinting
changes next to nothing, while every curve, bar and legend mark is coloured. It counts only
colour that the other picture has nowhere within a block (a shift by part of a block costs
nothing), sums it over WINDOW x WINDOW blocks, lets each window take the vertical shift that
fits it best (a font of another height moves what is below it) and reports the largest
window: a whole curve missing is a large local change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BLOCK = 4  # pixels per thumbnail block
WINDOW = 16  # blocks per side of the window a local change is summed over (64 px)
SHIFTS = range(-64, 65)  # vertical shifts a window may take, in blocks (256 px either way)

MEASURE = """<script>
window.addEventListener('load', () => {
  const pre = document.createElement('pre');
  pre.id = 'page-height';
  pre.textContent = JSON.stringify({height: document.documentElement.scrollHeight,
                                    body: Math.ceil(document.body.getBoundingClientRect().bottom)});
  document.body.appendChild(pre);
});
</script>"""


def _flags(profile: Path) -> list[str]:
    return [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
            "--virtual-time-budget=5000"]  # fmt: skip


def page_height(page: Path, work: Path, width: int) -> dict[str, int]:
    """{"height": the document's scroll height, "body": where the body's content ends}, in
    CSS pixels, as Chromium lays ``page`` out ``width`` pixels wide."""
    probe = work / f"measure-{page.name}"
    probe.write_text(page.read_text().replace("<head>", "<head>" + MEASURE, 1))
    env = {**os.environ, "HOME": str(work)}
    dom = subprocess.run([*_flags(work / "profile"), f"--window-size={width},800", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120,
                         env=env)  # fmt: skip
    found = dom.stdout.split('<pre id="page-height">', 1)
    assert len(found) == 2, dom.stdout[-2000:] + dom.stderr[-2000:]
    return json.loads(found[1].split("</pre>", 1)[0].replace("&quot;", '"'))


def screenshot(page: Path, out: Path, work: Path, width: int = 1200) -> np.ndarray:
    """RGB (H, width, 3) floats in [0, 1] of the whole of ``page`` (written to ``out``)."""
    from matplotlib import image  # noqa: PLC0415

    height = page_height(page, work, width)["height"]
    env = {**os.environ, "HOME": str(work)}
    subprocess.run([*_flags(work / "profile"), f"--window-size={width},{height}",
                    f"--screenshot={out}", page.as_uri()], capture_output=True, timeout=120,
                   env=env, check=True)  # fmt: skip
    return image.imread(out)[..., :3].astype(np.float64)


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """(H // BLOCK, W // BLOCK, 3) block means of RGB pixels (H, W, 3)."""
    h, w = (pixels.shape[0] // BLOCK) * BLOCK, (pixels.shape[1] // BLOCK) * BLOCK
    blocks = pixels[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK, 3)
    return blocks.mean(axis=(1, 3))


def _colour(thumb: np.ndarray) -> np.ndarray:
    """(h, w, 3): how far each channel stands above the block's grey (its least channel)."""
    return thumb - thumb.min(axis=2, keepdims=True)


def _near(c: np.ndarray) -> np.ndarray:
    """The most of each colour within one block of each block (3 x 3 maximum)."""
    padded = np.pad(c, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows, cols = c.shape[:2]
    return np.max([padded[i : i + rows, j : j + cols] for i in range(3) for j in range(3)], axis=0)


def _window_sums(d: np.ndarray) -> np.ndarray:
    s = np.pad(d, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return s[WINDOW:, WINDOW:] - s[:-WINDOW, WINDOW:] - s[WINDOW:, :-WINDOW] + s[:-WINDOW, :-WINDOW]


def difference(reference: np.ndarray, shot: np.ndarray) -> float:
    """The largest colour change of ``shot`` against ``reference`` (thumbnails) in any
    WINDOW x WINDOW blocks, each window at the vertical shift that fits it best (0: the
    same colours; parts of a page move by different amounts when a font changes)."""
    a, b = _colour(reference), _colour(shot)
    width = min(a.shape[1], b.shape[1])
    a, b = a[:, :width], b[:, :width]
    near_a, near_b = _near(a), _near(b)
    best = np.full((a.shape[0] - WINDOW + 1, width - WINDOW + 1), np.inf)
    for shift in SHIFTS:  # row i of a against row i + shift of b
        lo, hi = max(0, -shift), min(a.shape[0], b.shape[0] - shift)
        if hi - lo < WINDOW:
            continue
        pb, nb = b[lo + shift : hi + shift], near_b[lo + shift : hi + shift]
        # colour in one that the other has nowhere near: a curve gone, not one moved a pixel
        d = (np.maximum(a[lo:hi] - nb, 0) + np.maximum(pb - near_a[lo:hi], 0)).sum(axis=2)
        sums = _window_sums(d)
        best[lo : lo + len(sums)] = np.minimum(best[lo : lo + len(sums)], sums)
    return float(best[np.isfinite(best)].max())
