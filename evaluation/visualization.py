"""Pictures for the run folder and the dashboard: detections drawn on images, W&B box overlays, and the
precision–recall plot. Everything here works on CPU tensors and needs no logger."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.nn import functional as F
from torchvision.utils import draw_bounding_boxes, make_grid


DEFAULT_DRAWING_THRESHOLD = 0.3  # boxes drawn from this score where no validation chose one (its best F1)


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """One bright, saturated colour per class; hues spread by the golden ratio so neighbouring class ids (and
    any number of classes) get clearly different colours, and black label text stays readable on all of them."""
    colors = []
    for k in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def fit_to_tile(image: Tensor, boxes: Sequence[Tensor], tile: int) -> tuple[Tensor, list[Tensor]]:
    """Resize a uint8 (3,h,w) image so its longer side is ``tile`` and pad it to (3, tile, tile), scaling the
    boxes with it: small inputs get large enough for legible labels, large ones small enough for one grid."""
    h, w = image.shape[-2:]
    scale = tile / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = (
        F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)[0]
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    out = torch.zeros((3, tile, tile), dtype=torch.uint8)
    out[:, :nh, :nw] = resized
    return out, [b.float() * b.new_tensor([nw / w, nh / h, nw / w, nh / h]).float() for b in boxes]


def draw_boxes(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    scores: Tensor | None = None,
    width: int = 2,
) -> Tensor:
    """Boxes (N,4 xyxy pixels) drawn on a uint8 (3,H,W) image in their class colours, each with a caption
    "name" or "name 0.87" in black on the box colour."""
    if len(boxes) == 0:
        return image
    h, w = image.shape[-2:]
    boxes = boxes.float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    palette = class_colors(len(class_names))
    labels = labels.tolist()
    names = [class_names[k] if 0 <= k < len(class_names) else str(k) for k in labels]
    if scores is not None:
        names = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
    colors = [palette[k % len(palette)] for k in labels]
    return draw_bounding_boxes(
        image, boxes, labels=names, colors=colors, width=width, fill_labels=True, label_colors="black"
    )


def _caption(image: Tensor, text: str) -> Tensor:
    """``text`` in white on black at the top-left corner, to tell the ground-truth and prediction panels apart."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    left, top, right, bottom = draw.textbbox((3, 2), text)
    draw.rectangle((0, 0, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def prediction_grid(
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    predictions: Sequence[Mapping[str, Tensor]],
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    tile: int = 320,
    images_per_row: int = 2,
    threshold_note: str = "",
) -> Tensor:
    """A uint8 (3,H,W) grid: for each image, its ground truth (left) and its predictions with score
    ≥ ``score_threshold`` (right; ``threshold_note`` says how it was chosen), in the same class colours. Boxes are
    in each image's own pixels."""
    tiles = []
    for image, target, pred in zip(images, targets, predictions, strict=True):
        keep = pred["scores"] >= score_threshold
        image, (gt_boxes, pred_boxes) = fit_to_tile(image, [target["boxes"], pred["boxes"][keep]], tile)
        tiles.append(_caption(draw_boxes(image, gt_boxes, target["labels"], class_names), "ground truth"))
        shown = draw_boxes(image, pred_boxes, pred["labels"][keep], class_names, pred["scores"][keep])
        tiles.append(_caption(shown, f"predictions >= {score_threshold:.2f}{threshold_note}"))
    # padding in a mid grey, so panel borders show against dark and light images alike
    return make_grid(torch.stack(tiles), nrow=2 * images_per_row, padding=4, pad_value=128)


def save_png(image: Tensor, path: str | Path) -> Path:
    """A uint8 (3,H,W) tensor as a PNG (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
    return path


def wandb_boxes(boxes: Tensor, labels: Tensor, class_names: Sequence[str], scores: Tensor | None = None) -> dict:
    """One ``boxes`` entry of ``wandb.Image``: pixel-domain boxes with class ids, captions and scores."""
    names = dict(enumerate(class_names))
    data = []
    for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        item = {
            "position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": names.get(label, str(label)),
        }
        if scores is not None:
            score = float(scores[i])
            item["scores"] = {"score": score}
            item["box_caption"] += f" {score:.2f}"
        data.append(item)
    return {"box_data": data, "class_labels": names}


def plot_pr_curves(
    curves: Mapping[str, tuple[Tensor, Tensor]],
    path: str | Path | None = None,
    title: str = "precision-recall at IoU 0.5",
) -> np.ndarray:
    """One line per class (recall → precision; classes whose precision is all negative, i.e. absent from the
    ground truth, are left out), its AP (mean precision over the recall points) in the legend. Saved as PNG
    at ``path`` if given; returns the picture as a (H, W, 3) uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a bare Figure on the Agg canvas: no pyplot state, no GUI backend, safe inside a training process
    fig = Figure(figsize=(7, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = class_colors(len(curves))
    for (name, (recall, precision)), color in zip(curves.items(), colors):
        recall, precision = torch.as_tensor(recall).float().cpu(), torch.as_tensor(precision).float().cpu()
        if not (precision >= 0).any():
            continue
        ap = precision.clamp(min=0).mean().item()
        # darkened class colour: the bright box colours are too pale for thin lines on white
        ax.plot(
            recall.numpy(),
            precision.clamp(min=0).numpy(),
            color=tuple(c / 255 * 0.8 for c in color),
            linewidth=1.8,
            label=f"{name} (AP {ap:.3f})",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left", fontsize="small", ncol=1 + len(ax.lines) // 12)
    fig.tight_layout()
    canvas.draw()
    picture = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return picture
