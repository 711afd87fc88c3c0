"""YOLOv1's parts against the paper: the network's layers, the loss written out cell by cell, the
responsible-predictor rule, inference, and a tiny model that learns."""

import math

import pytest
import torch
from hydra.utils import instantiate

from detectors.batch import collate_detection
from detectors.yolo import (
    ResNetC5,
    responsible_objects,
    GridCells,
    ResponsiblePredictorAssigner,
    YOLOv1Head,
    YOLOv1Loss,
    YOLOv1Network,
    YOLOv1Postprocess,
)

from ..conftest import compose, fit_fixed_batch


def batch_of(objects_per_image, size=96):
    samples = []
    for i, objects in enumerate(objects_per_image):
        boxes = torch.tensor([o[:4] for o in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([o[4] for o in objects], dtype=torch.long)
        samples.append(
            (
                torch.zeros(3, size, size, dtype=torch.uint8),
                {"boxes": boxes, "labels": labels, "image_id": torch.tensor(i)},
            )
        )
    return collate_detection(samples)


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def rmse(a, b, size):
    """darknet's box_rmse: centre and size differences in image fractions."""
    ca = [(a[0] + a[2]) / 2, (a[1] + a[3]) / 2, a[2] - a[0], a[3] - a[1]]
    cb = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]
    return math.sqrt(sum(((x - y) / size) ** 2 for x, y in zip(ca, cb)))


def paper_loss(box, conf, probs, objects_per_image, s, nb, size, l_coord=5.0, l_noobj=0.5):
    """Eq. 3 of the paper as loops over images, cells and predictors (one object per cell: the largest)."""
    total = 0.0
    cell_px = size / s
    for b, objects in enumerate(objects_per_image):
        owner = {}
        for o in objects:
            cx, cy = (o[0] + o[2]) / 2, (o[1] + o[3]) / 2
            cell = int(cy // cell_px) * s + int(cx // cell_px)
            area = (o[2] - o[0]) * (o[3] - o[1])
            if cell not in owner or area > owner[cell][0]:
                owner[cell] = (area, o)
        for cell in range(s * s):
            row, col = divmod(cell, s)
            obj = owner.get(cell, (None, None))[1]
            preds = []
            for j in range(nb):
                x, y, sw, sh = box[b, cell * nb + j].tolist()
                cx, cy = (col + x) * cell_px, (row + y) * cell_px
                w, h = max(sw, 0) ** 2 * size, max(sh, 0) ** 2 * size
                preds.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            responsible = None
            if obj is not None:  # darknet's detection layer: the highest IoU, or with none the lowest RMSE
                ious = [iou(p, obj) for p in preds]
                responsible = max(range(nb), key=lambda j: (ious[j], -j))
                if max(ious) == 0:
                    responsible = min(range(nb), key=lambda j: (rmse(preds[j], obj, size), j))
            for j in range(nb):
                c = conf[b, cell * nb + j]
                if j == responsible:
                    t = [
                        ((obj[0] + obj[2]) / 2 - col * cell_px) / cell_px,
                        ((obj[1] + obj[3]) / 2 - row * cell_px) / cell_px,
                        math.sqrt((obj[2] - obj[0]) / size),
                        math.sqrt((obj[3] - obj[1]) / size),
                    ]
                    total = total + l_coord * sum((box[b, cell * nb + j, d] - t[d]) ** 2 for d in range(4))
                    total = total + (c - iou(preds[j], obj)) ** 2
                else:
                    total = total + l_noobj * c**2
            if obj is not None:
                for k in range(probs.shape[-1]):
                    total = total + (probs[b, cell, k] - (1.0 if k == obj[4] else 0.0)) ** 2
    return total / len(objects_per_image)


def test_loss_equals_the_papers_formula_value_and_gradient():
    s, nb, k, size = 3, 2, 3, 96
    g = torch.Generator().manual_seed(0)
    objects = [
        [(10, 10, 40, 50, 1), (60, 5, 90, 30, 2), (12, 14, 30, 26, 0)],  # two centres in cell 0: largest wins
        [(33, 40, 62, 60, 0)],
    ]
    box = (torch.rand(2, s * s * nb, 4, generator=g) * 1.2 - 0.1).requires_grad_()  # some √w < 0
    conf = torch.rand(2, s * s * nb, generator=g).requires_grad_()
    probs = torch.rand(2, s * s, k, generator=g).requires_grad_()
    outputs = {"box_deltas": box, "objectness": conf, "class_scores": probs}
    priors = GridCells(s, nb)((size, size), [(s, s)])
    assigned = ResponsiblePredictorAssigner(s)(priors, batch_of(objects, size), k, outputs)
    ours = sum(YOLOv1Loss(grid_size=s)(outputs, assigned, priors).values())
    ref = paper_loss(box, conf, probs, objects, s, nb, size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(ours, (box, conf, probs))
    want = torch.autograd.grad(ref, (box, conf, probs))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


def test_two_objects_in_one_cell_the_largest_takes_it():
    s, nb, k, size = 2, 2, 3, 100
    priors = GridCells(s, nb)((size, size), [(s, s)])
    outputs = {
        "box_deltas": torch.zeros(1, s * s * nb, 4),
        "objectness": torch.zeros(1, s * s * nb),
        "class_scores": torch.zeros(1, s * s, k),
    }
    # both centres in cell 0; the second is larger and takes the cell whatever the order
    for objects in ([(10, 10, 20, 20, 0), (5, 5, 40, 40, 2)], [(5, 5, 40, 40, 2), (10, 10, 20, 20, 0)]):
        out = ResponsiblePredictorAssigner(s)(priors, batch_of([objects], size), k, outputs)
        assert out["cell_labels"][0].tolist() == [2, 3, 3, 3]
        torch.testing.assert_close(out["boxes"][0, 0], torch.tensor([5.0, 5, 40, 40]))


def test_the_predictor_with_the_higher_iou_is_responsible():
    s, nb, k, size = 2, 2, 2, 100
    priors = GridCells(s, nb)((size, size), [(s, s)])
    box = torch.zeros(1, s * s * nb, 4)
    box[0, 2] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # cell 1 (top right), predictor 0: a small box
    box[0, 3] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # predictor 1: the object's size
    outputs = {"box_deltas": box, "objectness": torch.zeros(1, 8), "class_scores": torch.zeros(1, 4, k)}
    out = ResponsiblePredictorAssigner(s)(priors, batch_of([[(62.5, 12.5, 87.5, 37.5, 1)]], size), k, outputs)
    assert out["labels"][0].tolist() == [2, 2, 2, 1, 2, 2, 2, 2]
    assert out["iou"][0, 3] == pytest.approx(1.0, abs=1e-5)


def test_with_no_overlap_the_nearest_predictor_is_responsible():
    # darknet's rule: neither prediction overlaps the object, predictor 1 is nearer (RMSE 0.30 against 0.45 in
    # image fractions) and learns it; with no_overlap='first' predictor 0 would take every such object
    s, nb, k, size = 2, 2, 2, 100
    priors = GridCells(s, nb)((size, size), [(s, s)])
    box = torch.zeros(1, s * s * nb, 4)
    box[0, 0] = torch.tensor([0.0, 0.0, 0.05, 0.05])  # cell 0, predictor 0: a tiny box at the cell's corner
    box[0, 1] = torch.tensor([0.5, 0.9, 0.2, 0.2])  # predictor 1: a 4 px box centred at (25, 45), below it
    outputs = {"box_deltas": box, "objectness": torch.zeros(1, 8), "class_scores": torch.zeros(1, 4, k)}
    objects = batch_of([[(15.0, 15.0, 35.0, 35.0, 1)]], size)  # a 20 px object centred in cell 0, off both boxes
    out = ResponsiblePredictorAssigner(s)(priors, objects, k, outputs)
    assert out["iou"][0, :2].tolist() == [0.0, 0.0]
    assert out["labels"][0].tolist() == [2, 1, 2, 2, 2, 2, 2, 2]
    first = ResponsiblePredictorAssigner(s, no_overlap="first")(priors, objects, k, outputs)
    assert first["labels"][0].tolist() == [1, 2, 2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="no_overlap"):
        ResponsiblePredictorAssigner(s, no_overlap="last")


def test_negative_sqrt_predictions_give_finite_loss_and_gradients():
    s, nb, k, size = 3, 2, 2, 96
    box = torch.full((1, s * s * nb, 4), -0.5, requires_grad=True)
    outputs = {
        "box_deltas": box,
        "objectness": torch.zeros(1, s * s * nb, requires_grad=True),
        "class_scores": torch.zeros(1, s * s, k),
    }
    priors = GridCells(s, nb)((size, size), [(s, s)])
    assigned = ResponsiblePredictorAssigner(s)(priors, batch_of([[(10, 10, 50, 50, 1)]], size), k, outputs)
    total = sum(YOLOv1Loss(grid_size=s)(outputs, assigned, priors).values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(box.grad).all()
    detections = YOLOv1Postprocess(grid_size=s)(outputs, priors, torch.tensor([[size, size]]))
    assert all(torch.isfinite(d["boxes"]).all() for d in detections)


def test_confidence_target_one_by_setting():
    s, nb, k, size = 2, 1, 2, 100
    priors = GridCells(s, nb)((size, size), [(s, s)])
    outputs = {
        "box_deltas": torch.zeros(1, 4, 4),
        "objectness": torch.zeros(1, 4),
        "class_scores": torch.zeros(1, 4, k),
    }
    assigned = ResponsiblePredictorAssigner(s)(priors, batch_of([[(10, 10, 30, 30, 0)]], size), k, outputs)
    assert YOLOv1Loss(confidence_target="one", grid_size=s)(outputs, assigned, priors)["loss_obj"] == 1.0
    assert YOLOv1Loss(confidence_target="iou", grid_size=s)(outputs, assigned, priors)["loss_obj"] == 0.0
    with pytest.raises(ValueError, match="confidence_target"):
        YOLOv1Loss(confidence_target="half")


def test_class_specific_confidence_and_boxes_in_image_pixels():
    s, nb, k, size = 2, 2, 3, 100
    priors = GridCells(s, nb)((size, size), [(s, s)])
    box = torch.zeros(1, 8, 4)
    box[0, 6] = torch.tensor([0.5, 0.5, 0.4, 0.6])  # cell 3 (bottom right), predictor 0
    conf = torch.zeros(1, 8)
    conf[0, 6] = 0.9
    probs = torch.zeros(1, 4, k)
    probs[0, 3] = torch.tensor([0.1, 0.8, 0.1])
    outputs = {"box_deltas": box, "objectness": conf, "class_scores": probs}
    det = YOLOv1Postprocess(score_thresh=0.05, grid_size=s)(outputs, priors, torch.tensor([[size, size]]))[0]
    assert det["labels"].tolist() == [1, 0, 2]
    torch.testing.assert_close(det["scores"], torch.tensor([0.72, 0.09, 0.09]))
    w, h = 0.4**2 * size, 0.6**2 * size
    torch.testing.assert_close(det["boxes"][0], torch.tensor([75 - w / 2, 75 - h / 2, 75 + w / 2, 75 + h / 2]))


def test_scores_multiply_probabilities_clamped_to_0_1():
    # raw outputs −0.8 (class) × −0.9 (confidence) would score 0.72 unclamped; 1.5 × 0.5 would score 0.75
    s, nb, k, size = 2, 1, 2, 100
    priors = GridCells(s, nb)((size, size), [(s, s)])
    box = torch.full((1, 4, 4), 0.5)
    conf = torch.tensor([[-0.9, 0.5, 0.0, 0.0]])
    probs = torch.zeros(1, 4, k)
    probs[0, 0] = torch.tensor([-0.8, 0.0])
    probs[0, 1] = torch.tensor([1.5, 0.0])
    outputs = {"box_deltas": box, "objectness": conf, "class_scores": probs}
    det = YOLOv1Postprocess(score_thresh=0.05, grid_size=s)(outputs, priors, torch.tensor([[size, size]]))[0]
    assert det["labels"].tolist() == [0]
    torch.testing.assert_close(det["scores"], torch.tensor([0.5]))  # min(1.5, 1) × 0.5; cell 0 scores 0


@pytest.mark.parametrize("variant, convs, channels", [("full", 24, 1024), ("fast", 9, 256)])
def test_networks_have_the_papers_layers_and_a_7x7x30_output(variant, convs, channels):
    net = YOLOv1Network(variant, width=0.125)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs
    assert sum(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.1 for m in net.modules()) == convs
    feature = net(torch.zeros(1, 3, 448, 448))[0]
    assert feature.shape[-2:] == (7, 7) and net.out_channels == channels // 8
    head = YOLOv1Head(net.out_channels, num_anchors=2, num_classes=20, hidden=32)
    assert head.fc[-1].out_features == 7 * 7 * 30  # 7×7×30 on VOC
    assert isinstance(head.fc[3], torch.nn.Dropout) and head.fc[3].p == 0.5


def test_model_configs_compose():
    for name, convs in (("yolo", 24), ("yolo_fast", 9)):
        cfg = compose(f"model={name}", "model.backbone.width=0.0625", "model.head.hidden=16")
        detector = instantiate(cfg.model).net
        assert sum(isinstance(m, torch.nn.Conv2d) for m in detector.backbone.modules()) == convs
        assert cfg.model.loss.lambda_coord == 5 and cfg.model.loss.lambda_noobj == 0.5
        assert cfg.model.priors.grid_size == 7 and cfg.model.priors.boxes_per_cell == 2


def test_config_holds_the_papers_constants():
    m = compose("model=yolo").model
    assert (m.head.hidden, m.head.dropout, m.head.fully_connected) == (4096, 0.5, True)  # §2.2
    assert m.loss.confidence_target == "iou"  # §2: Pr(object) · IOU(pred, truth)
    assert m.assigner.no_overlap == "nearest"  # darknet's detection layer (the paper is silent)
    assert list(m.pixel_mean) == [0, 0, 0] and list(m.pixel_std) == [1, 1, 1]  # darknet feeds [0, 1] pixels


@pytest.mark.slow
def test_tiny_yolo_learns_a_fixed_batch():
    cfg = compose(
        "model=yolo",
        "model/optimizer=adamw",
        "model.optimizer.lr=0.001",
        "model/backbone=resnet_c5",
        "model.head.hidden=256",
        "model.head.dropout=0",
        "data.image_size=128",
        "data.num_train=16",
        "data.train_transform.size=128",
        "model.priors.grid_size=4",
    )  # C5 4×4 = S×S (448 px: 2.5 min)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    batch = collate_detection([data.train_set[i] for i in range(4)])
    history = fit_fixed_batch(model, batch, 30)  # 30 steps: total ÷29, box ÷70, class ÷12 (AVX2 EPYC)
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.3 * sum(first.values())
    assert last["loss_box"] < 0.5 * first["loss_box"] and last["loss_cls"] < 0.5 * first["loss_cls"]


def test_convolutional_head_keeps_cells_row_major():
    s = 3
    head = YOLOv1Head(1, num_anchors=2, num_classes=2, grid_size=s, hidden=1, dropout=0.0, fully_connected=False)
    with torch.no_grad():  # identity 3×3, then copy to every output channel
        head.fc[0].weight.zero_()
        head.fc[0].weight[0, 0, 1, 1] = 1
        head.fc[0].bias.zero_()
        head.fc[3].weight.fill_(1)
        head.fc[3].bias.zero_()
    feature = (torch.arange(s * s, dtype=torch.float32) + 1).view(1, 1, s, s)  # cell r·S + c holds r·S + c + 1
    out = head([feature])
    cells = torch.arange(s * s, dtype=torch.float32) + 1
    torch.testing.assert_close(out["class_scores"][0], cells[:, None].expand(-1, 2))
    torch.testing.assert_close(out["objectness"][0], cells.repeat_interleave(2))


def test_paper_recipe_composes_with_the_papers_schedule():
    cfg = compose("experiment=yolov1_voc0712")
    assert cfg.model.backbone._target_.endswith("YOLOv1Network") and cfg.model.backbone.variant == "full"
    assert cfg.data.train_transform._target_.endswith("YOLOAugmentation") and cfg.data.train_transform.size == 448
    assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 135
    opt, sched = cfg.model.optimizer, cfg.model.scheduler
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.01, 0.9, 0.0005)
    steps_per_epoch = math.ceil(16551 / 64)  # VOC07+12 trainval images
    assert sched.milestones == [75 * steps_per_epoch, 105 * steps_per_epoch] and sched.gamma == 0.1
    assert opt.lr * sched.warmup_factor == pytest.approx(1e-3)  # warm-up from 10⁻³


def test_responsible_objects_keeps_the_largest_object_of_a_cell():
    """The docstring's example: A and B centred in cell 0 (A larger), C in cell 3; invalid objects never win."""
    boxes = torch.tensor([[[0.0, 0, 40, 40], [10, 10, 30, 30], [60, 60, 90, 90], [0, 0, 99, 99]]])
    ok = torch.tensor([[True, True, True, False]])  # the 4th, largest, is padding (or a crowd box)
    assert responsible_objects(boxes, ok, (100, 100), 2).tolist() == [[0, -1, -1, 2]]
    # equal areas: the first listed
    twins = torch.tensor([[[0.0, 0, 20, 20], [0, 0, 20, 20]]])
    assert responsible_objects(twins, torch.ones(1, 2, dtype=torch.bool), (100, 100), 2).tolist() == [[0, -1, -1, -1]]
    # B moved to centre (30, 30): the same cell as A at S = 2, its own at S = 4 (25 px cells: cell 5)
    boxes[0, 1] = torch.tensor([22.0, 22, 38, 38])
    assert responsible_objects(boxes, ok, (100, 100), 2).tolist() == [[0, -1, -1, 2]]
    fine = responsible_objects(boxes, ok, (100, 100), 4)[0]
    assert fine.tolist() == [0, -1, -1, -1, -1, 1] + [-1] * 9 + [2]


def test_resnet_c4_gives_a_grid_twice_as_fine_with_its_channels():
    """last_stage=4 ends at C4: stride 16, half C5's channels (ResNet-18: 256 of 512; ResNet-50: 1024 of 2048)."""
    images = torch.zeros(1, 3, 160, 160)
    for depth, c5 in ((18, 512), (50, 2048)):
        c4_net = ResNetC5(depth, last_stage=4)
        (c4,) = c4_net(images)
        assert c4_net.out_channels == c5 // 2 and c4.shape == (1, c5 // 2, 10, 10)
    (c5_map,) = ResNetC5(18)(images)
    assert c5_map.shape == (1, 512, 5, 5)
    with pytest.raises(ValueError, match="last_stage=3"):
        ResNetC5(18, last_stage=3)
