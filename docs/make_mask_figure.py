"""Draw the binary masks of one converted layer: each row is a primary filter, each tile the mask of
one of its secondary filters (input channels side by side, 3x3 each; white = kept).

    python docs/make_mask_figure.py demo-output/resnet20.ft.vc.pt --layer layer3.0.conv2 -o docs/masks.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vconvert.io.checkpoint import load_checkpoint
from vconvert.nn.versatile import group_members


def mask_image(masks: torch.Tensor, members: torch.Tensor, rows: int, channels: int, cell: int = 6) -> Image.Image:
    """Tiles of (rows primaries) x (s secondaries), each showing ``channels`` channels of kh x kw."""
    _, _, kh, kw = masks.shape
    slots = members.shape[1]
    tile_w, tile_h, gap = channels * (kw + 1) * cell, kh * cell, 2 * cell
    image = Image.new("RGB", (slots * (tile_w + gap) + gap, rows * (tile_h + gap) + gap), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    for row in range(rows):
        for slot in range(slots):
            output = int(members[row, slot])
            if output < 0:
                continue
            left, top = gap + slot * (tile_w + gap), gap + row * (tile_h + gap)
            for channel in range(channels):
                for y in range(kh):
                    for x in range(kw):
                        on = bool(masks[output, channel, y, x] > 0.5)
                        x0 = left + (channel * (kw + 1) + x) * cell
                        y0 = top + y * cell
                        draw.rectangle(
                            [x0, y0, x0 + cell - 2, y0 + cell - 2], fill=(235, 235, 235) if on else (90, 90, 90)
                        )
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--layer", default="layer3.0.conv2")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/masks.png"))
    args = parser.parse_args()
    layer = load_checkpoint(args.checkpoint).model.get_submodule(args.layer)
    masks = layer.output_mask().detach().expand(layer.out_channels, -1, -1, -1)
    members = group_members(layer.primary_index, layer.secondary_index, layer.num_primary)
    mask_image(masks, members, min(args.rows, layer.num_primary), min(args.channels, layer.channel_window)).save(
        args.output
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
