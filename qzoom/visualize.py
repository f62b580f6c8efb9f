"""Drawing what the model looked at: the SD-RPN heatmap over the image and every zoom box, as a PIL image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from qzoom.engine import SequenceState

BOX_COLOURS = [(255, 40, 40), (40, 200, 255), (255, 200, 0), (120, 255, 80)]


def heatmap_overlay(image: Image.Image, prob: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """`image` with a red overlay whose opacity follows `prob` (an (H, W) map in [0, 1] over the whole image)."""
    heat = Image.fromarray((np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8), mode="L").resize(
        image.size, Image.Resampling.BILINEAR
    )
    red = Image.new("RGB", image.size, (255, 0, 0))
    mask = heat.point(lambda v: int(v * alpha))
    return Image.composite(red, image.convert("RGB"), mask)


def render(st: SequenceState) -> Image.Image:
    """The original image, the first (global) SD-RPN map as a heatmap, and each zoom step's box with its number."""
    out = st.image.convert("RGB")
    global_maps = [p for p in st.proposals if p.block.step == 0]
    if global_maps:
        out = heatmap_overlay(out, global_maps[0].prob.float().cpu().numpy())
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 300))
    for block in st.blocks[1:]:
        colour = BOX_COLOURS[(block.step - 1) % len(BOX_COLOURS)]
        b = block.box
        draw.rectangle((b.x0, b.y0, b.x1 - 1, b.y1 - 1), outline=colour, width=width)
        draw.text((b.x0 + width + 2, b.y0 + width + 2), str(block.step), fill=colour)
    return out
