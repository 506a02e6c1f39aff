"""Starting weights for the tiny demo model: a small "DeiT" and "BERT", trained CLIP-style.

Real ViCHA pretraining starts from DeiT-B/16 and bert-base-uncased, whose [CLS] features already
differ between inputs. A randomly initialised tiny model does not have that: its [CLS] features are
nearly identical, and ITC against the detached momentum bank has almost no gradient there, so the
demo never learns image-text alignment (docs/demo.md). This tool gives the demo what the real run
gets from its initial weights: it trains the two unimodal towers of the tiny model (the ViT and the
text layers of the BERT) with an in-batch image-text contrastive loss on the demo's *pretraining*
corpus only. DeiT is also a supervised classifier, and the tiny ViT gets that too: its [CLS] and its
mean patch token classify an endless stream of freshly drawn labelled pictures
(`synthetic.labelled_pictures`: which shapes, colours and coloured shapes each holds). Trained on the
1,000 corpus pictures alone, the ViT encoded colours but no shape (a linear probe of "holds a <shape>"
scored the majority class) and memorised rather than learnt shapes when given them as labels there.
The towers are written in the formats the real loaders read:

  <out>/vit.pth        {'model': ViT state_dict} in DeiT/timm names  -> config `deit_checkpoint`
  <out>/bert/          config.json, pytorch_model.bin, vocab.txt     -> `--text_encoder` (init_bert)

Example: python tools/make_tiny_init.py --data_dir data/demo --out data/demo/init
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import utils  # noqa: E402
from dataset import resolve_paths  # noqa: E402
from dataset import synthetic  # noqa: E402
from dataset.pretrain_dataset import PretrainDataset  # noqa: E402
from dataset.transforms import build_transform  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.tasks.base import TokenizingCollate  # noqa: E402
from engine.tasks.pretrain import CAPTION  # noqa: E402
from models import losses  # noqa: E402
from models.backbone import build_text_encoder, build_visual_encoder, load_bert_config  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402


class TinyTowers(nn.Module):
    """ViT + BERT text layers + linear projections, scored by a learnable logit scale (CLIP), and a
    multi-label classification head for the labelled pictures."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        bert_config = load_bert_config(config, encoder_width=config["vision_width"])
        self.visual_encoder = build_visual_encoder(config)
        self.text_encoder = build_text_encoder(bert_config, "mlm", None, init_bert=False)
        self.vision_proj = nn.Linear(config["vision_width"], config["embed_dim"])
        self.text_proj = nn.Linear(bert_config.hidden_size, config["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.class_head = nn.Linear(config["vision_width"], len(synthetic.SCENE_CLASSES))

    def forward(self, image: torch.Tensor, caption, pictures: torch.Tensor,
                classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """In-batch contrastive loss of (image, caption), multi-label classification loss of
        (pictures, classes), the (B, B) image-to-text logits and the pictures' class logits. One ViT
        pass for both image sets."""
        tokens = self.visual_encoder(torch.cat([image, pictures]))
        image_cls, picture_tokens = tokens[: len(image), 0], tokens[len(image):]
        # The [CLS] and the mean patch token both classify (the fusion layers read the patch tokens):
        # one head call over (2, n, width).
        both_logits = self.class_head(torch.stack([picture_tokens[:, 0], picture_tokens[:, 1:].mean(1)]))
        classification = F.binary_cross_entropy_with_logits(both_logits, classes.expand_as(both_logits),
                                                            reduction="sum") / len(pictures)
        class_logits = both_logits[0]
        image_feat = F.normalize(self.vision_proj(image_cls), dim=-1)
        text = self.text_encoder.bert(caption.input_ids, caption.attention_mask, mode="text").last_hidden_state
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100.0) * image_feat @ text_feat.t()
        targets = torch.eye(len(logits), device=logits.device)  # the ITC loss with in-batch positives only
        return losses.contrastive_loss(logits, logits.t(), targets, targets), classification, logits, class_logits


SHAPE_CLASSES = slice(0, len(synthetic.SHAPES))  # SCENE_CLASSES lists the shapes first


def labelled_picture_batch(rng: random.Random, n: int, image_res: int, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh labelled pictures as model input (n, 3, H, W) and multi-hot classes (n, C)."""
    pictures, classes = synthetic.labelled_pictures(rng, n, image_res)
    return torch.stack([transform(picture) for picture in pictures]), torch.tensor(classes)


def train_tiny_towers(config_path: str, data_dir: str, out_dir: str, tokenizer_dir: str, steps: int = 1000,
                      batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log_every: int = 50,
                      data_json_dir: str | None = None, class_weight: float = 1.0) -> dict:
    """Train the towers on ``config['train_file']`` (relative to ``data_json_dir``, default
    ``<data_dir>/json_pretrain``, as Pretrain.py) and write them to ``out_dir``.

    Each step also classifies ``batch_size`` freshly drawn labelled pictures (weight ``class_weight``).
    Returns {'loss': final-window mean contrastive loss, 'accuracy': final-window in-batch i2t accuracy,
    'classification_loss', 'shape_accuracy': final-window accuracy of "holds a <shape>" on the fresh
    pictures (before the step that learns from them), 'shape_always_no': that of answering no to every
    shape, ...}.
    """
    config = resolve_paths("Pretrain", load_config(config_path), data_dir,
                           data_json_dir or os.path.join(data_dir, "json_pretrain"))
    train_files = config["train_file"]
    for path in train_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretraining annotations {path} not found (run tools/make_demo_data.py first)")
    utils.seed_everything(seed)
    tokenizer = build_tokenizer(tokenizer_dir)
    # No augmentation: the towers only need distinct, meaningful [CLS] features, quickly.
    transform = build_transform("test", config["image_res"])
    dataset = PretrainDataset(train_files, transform, data_dir,
                              sep_token=config.get("sep_token", True))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=generator, num_workers=0,
                                         collate_fn=TokenizingCollate(tokenizer, 1, (CAPTION, None)))  # VCs unused
    model = TinyTowers(config)
    picture_rng = random.Random(f"tiny-init-pictures/{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.02)
    warmup = max(1, steps // 15)
    step, window, start = 0, [], time.time()
    model.train()
    while step < steps:
        for image, (caption, _vc) in loader:
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            pictures, classes = labelled_picture_batch(picture_rng, batch_size, config["image_res"], transform)
            itc, classification, logits, class_logits = model(image, caption, pictures, classes)
            loss = itc + class_weight * classification
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            accuracy = (logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
            # "holds a <shape>" on pictures the model had not seen before this step
            held_shapes = classes[:, SHAPE_CLASSES] > 0.5
            shape_accuracy = ((class_logits[:, SHAPE_CLASSES] > 0) == held_shapes).float().mean()
            always_no = 1.0 - held_shapes.float().mean()  # the accuracy of answering "no" to every shape
            # read back only when logging
            window.append(torch.stack([itc.detach(), classification.detach(), accuracy, shape_accuracy, always_no]))
            step += 1
            if step % log_every == 0 or step == steps:
                mean_loss, mean_class_loss, mean_acc, mean_shape_acc, mean_always_no = \
                    torch.stack(window[-log_every:]).mean(0).tolist()
                window = []
                if not (math.isfinite(mean_loss) and math.isfinite(mean_class_loss)):
                    raise FloatingPointError(f"tiny-init loss is {mean_loss} (classification {mean_class_loss}) "
                                             f"in steps {step - log_every + 1}-{step}")
                print(f"[tiny init] step {step}/{steps}  loss {mean_loss:.3f}  in-batch i2t acc {mean_acc:.3f} "
                      f"(chance {1 / batch_size:.3f})  classification {mean_class_loss:.3f}  new pictures' shape "
                      f"accuracy {mean_shape_acc:.3f} (always no {mean_always_no:.3f})  {time.time() - start:.0f}s",
                      flush=True)
            if step >= steps:
                break
    write_towers(model, config, tokenizer_dir, out_dir)
    return {"loss": mean_loss, "accuracy": mean_acc, "chance": 1 / batch_size, "classification_loss": mean_class_loss,
            "shape_accuracy": mean_shape_acc, "shape_always_no": mean_always_no, "steps": steps,
            "seconds": time.time() - start}


def write_towers(model: TinyTowers, config: dict, tokenizer_dir: str, out_dir: str) -> None:
    """``vit.pth`` (DeiT layout) and a BERT folder that ``--text_encoder`` and the tokenizer accept."""
    bert_dir = os.path.join(out_dir, "bert")
    os.makedirs(bert_dir, exist_ok=True)
    utils.atomic_save({"model": model.visual_encoder.state_dict()}, os.path.join(out_dir, "vit.pth"))
    utils.atomic_save(model.text_encoder.state_dict(), os.path.join(bert_dir, "pytorch_model.bin"))
    shutil.copyfile(config["bert_config"], os.path.join(bert_dir, "config.json"))
    shutil.copyfile(os.path.join(tokenizer_dir, "vocab.txt"), os.path.join(bert_dir, "vocab.txt"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="the demo data folder (tools/make_demo_data.py --out)")
    parser.add_argument("--out", required=True, help="output folder for vit.pth and bert/")
    parser.add_argument("--data_json_dir", default=None, help="annotation folder (default: <data_dir>/json_pretrain)")
    parser.add_argument("--config", default="configs/demo/Pretrain.yaml", help="model sizes and train_file")
    parser.add_argument("--tokenizer", default=None, help="vocabulary folder (default: <data_dir>/tokenizer)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class_weight", type=float, default=1.0,
                        help="weight of the labelled-picture classification loss (0: contrastive only)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer_dir = args.tokenizer or os.path.join(args.data_dir, "tokenizer")
    result = train_tiny_towers(args.config, args.data_dir, args.out, tokenizer_dir, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               data_json_dir=args.data_json_dir, class_weight=args.class_weight)
    print(f"[tiny init] wrote {args.out}/vit.pth and {args.out}/bert/ ({json.dumps(result)})")
    return result


if __name__ == "__main__":
    main()
