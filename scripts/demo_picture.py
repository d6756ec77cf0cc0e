"""The front page's picture: samples of the demo's unsupervised and filter models, side by side.

    python scripts/demo_picture.py runs/demo [--out docs/assets/demo_samples.png]

Draws the same number of samples from each finished run of a demo (or benchmark) folder with the
run's own sampler and seed 0, and writes one small PNG: a labeled grid per method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import pudm
from pudm.sampling import make_grid

ROOT = Path(__file__).resolve().parents[1]


def picture(demo: Path, methods: list[str], num: int, scale: int) -> Image.Image:
    """One labeled grid per method, left to right, enlarged ``scale`` times (nearest neighbour)."""
    panels = []
    for method in methods:
        run = demo / "runs" / f"{method}-seed0"
        if not (run / "summary.json").is_file():
            raise SystemExit(f"{run} is not a finished run: run `pudm demo --out {demo}` first")
        grid = make_grid(pudm.sample(run, num=num, seed=0, show_progress=False), columns=int(np.sqrt(num)))
        image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        panel = Image.new("RGB", (image.width, image.height + 24), "white")
        panel.paste(image, (0, 24))
        ImageDraw.Draw(panel).text((4, 6), method, fill="black")
        panels.append(panel)
    gap = 16
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, max(panel.height for panel in panels)), "white")
    left = 0
    for panel in panels:
        out.paste(panel, (left, 0))
        left += panel.width + gap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a finished pudm demo or benchmark folder")
    parser.add_argument("--methods", default="unsupervised,filter", help="runs to show, left to right")
    parser.add_argument("--num", type=int, default=64, help="samples per method (a square number)")
    parser.add_argument("--scale", type=int, default=4, help="enlargement of the 8 px digits")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets" / "demo_samples.png")
    args = parser.parse_args()
    image = picture(args.demo, args.methods.split(","), args.num, args.scale)
    tmp = args.out.with_name(f".{args.out.name}.tmp.png")
    image.save(tmp, optimize=True)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
