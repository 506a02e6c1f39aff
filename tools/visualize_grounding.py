"""Draw the Grad-CAM heat map of a referring expression, the chosen proposal and the true box to a PNG.

    python tools/visualize_grounding.py --config configs/Grounding.yaml \
        --checkpoint output/RefCOCO/checkpoint_best.pth --data_dir /data --data_json_dir /data/json \
        --ref_id 1234 [--text "the man on the left"] --out cam.png

The expression, image and VCs of ``--ref_id`` come from the config's test files; ``--text`` replaces
the phrase. The predicted box (red) is the proposal of ``det_file`` picked as in the evaluation,
the true box (green) is the REFER annotation. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from dataset import GroundingDataset, build_transform, load_image, load_json, resolve_paths  # noqa: E402
from dataset.base import join_root  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.retrieval_eval import VC_LENGTH  # noqa: E402
from engine.tasks.grounding import (GRADCAM_MODES, RefReader, compute_iou, resolve_block_num, select_box,  # noqa: E402
                                    upsample_heatmap)
from models import MODEL_BUILDERS  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402

PREDICTED_COLOUR = (230, 30, 30)
TRUE_COLOUR = (40, 220, 60)


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a jet-like blue-cyan-yellow-red ramp."""
    v = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(image: Image.Image, heatmap: torch.Tensor, opacity: float = 0.5) -> Image.Image:
    """Blend the (H, W) heat map, scaled to [0, 1], over the image."""
    heat = heatmap.numpy()
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colours = Image.fromarray(jet(heat)).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), colours, opacity)


def draw_box(draw: ImageDraw.ImageDraw, box: Sequence[float], scale: int, colour, label: str) -> None:
    x, y, w, h = (v * scale for v in box[:4])
    draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=max(1, scale // 2))
    draw.text((x + 2, y + 1), label, fill=colour)


def find_record(dataset: GroundingDataset, ref_id: int) -> int:
    for index in range(len(dataset)):
        if int(dataset.field(index, "ref_id")) == ref_id:
            return index
    raise KeyError(f"ref_id {ref_id} is in none of the test files {dataset.ann.files}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/Grounding.yaml")
    parser.add_argument("--checkpoint", required=True, help="a grounding (or retrieval) checkpoint")
    parser.add_argument("--data_dir", required=True, help="folder the image paths are relative to")
    parser.add_argument("--data_json_dir", required=True, help="folder of the test JSONs and refcoco+/")
    parser.add_argument("--text_encoder", default="bert-base-uncased", help="tokenizer vocabulary")
    parser.add_argument("--ref_id", type=int, required=True, help="referring expression to show")
    parser.add_argument("--text", default=None, help="phrase to ground instead of the expression of --ref_id")
    parser.add_argument("--gradcam_mode", default="itm", choices=sorted(GRADCAM_MODES),
                        help="itm: ITM score on a text layer's cross-attention; itc: ITC similarity on a ViT block")
    parser.add_argument("--block_num", type=int, default=None, help="Grad-CAM layer (default: config, else 8)")
    parser.add_argument("--scale", type=int, default=None, help="upscaling of small images (default: to >= 384 px)")
    parser.add_argument("--out", default="grounding.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    config = resolve_paths("Grounding", load_config(args.config), args.data_dir, args.data_json_dir)
    tokenizer = build_tokenizer(args.text_encoder)
    device = torch.device(args.device)
    model = MODEL_BUILDERS["grounding"](dict(config, init_bert=False, init_deit=False), text_encoder=None,
                                        tokenizer=tokenizer)
    load_checkpoint(model, args.checkpoint, "grounding", training=False)
    model.to(device).eval()

    dataset = GroundingDataset(config["test_file"], build_transform("test", config["image_res"]),
                               config["image_root"], mode="test", sep_token=config.get("sep_token", True))
    index = find_record(dataset, args.ref_id)
    (image, vc_string), text, _ = dataset[index]
    text = args.text if args.text is not None else text
    vc = tokenizer([vc_string], padding="max_length", truncation=True, max_length=VC_LENGTH).to(device)
    phrase = tokenizer([text], padding="longest", truncation=False).to(device)
    block_num = resolve_block_num(args.block_num, config)
    cam = GRADCAM_MODES[args.gradcam_mode](model, image[None].to(device), vc, phrase, block_num)[0].cpu()

    refer = RefReader(config["refcoco_data"])
    record = refer.image(args.ref_id)
    heatmap = upsample_heatmap(cam, record["height"], record["width"])
    proposals = load_json(config["det_file"]).get(str(record["id"]), [])
    predicted = select_box(heatmap, proposals)
    true_box = refer.box(args.ref_id)

    picture = load_image(join_root(config["image_root"], dataset.field(index, "image")))
    picture = picture.resize((record["width"], record["height"]))
    scale = args.scale or max(1, -(-384 // max(picture.size)))
    canvas = overlay(picture, heatmap).resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    draw_box(draw, true_box, scale, TRUE_COLOUR, "true")
    if predicted is not None:
        draw_box(draw, predicted, scale, PREDICTED_COLOUR, "predicted")
    draw.text((4, 4), text, fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    canvas.save(args.out)
    summary = {"ref_id": args.ref_id, "text": text, "predicted_box": predicted, "true_box": true_box,
               "iou": compute_iou(true_box, predicted) if predicted is not None else 0.0, "scale": scale,
               "out": os.path.abspath(args.out)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
