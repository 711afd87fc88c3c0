"""SSD's parts against the paper's formulas and torchvision's SSD300."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from detectors.assigners import IGNORE
from detectors.batch import collate_detection
from detectors.boxes import BoxCoder
from detectors.priors import Priors
from detectors.ssd import (
    SSD300_LAYERS,
    BestMatchIoUAssigner,
    DefaultBoxGenerator,
    MultiBoxLoss,
    SSDPostprocess,
    VGG16Atrous,
    default_box_scales,
    load_vgg16_weights,
    torchvision_ssd_state_dict,
)

from ..conftest import (
    FLOAT32_ROUNDINGS_IN_DECODE,
    assert_same_detections,
    compose,
    detections_in_float64,
    fit_fixed_batch,
    float32_box_atol,
)

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def make_batch(boxes_per_image, labels_per_image, crowd_per_image=None):
    samples = []
    for i, (boxes, labels) in enumerate(zip(boxes_per_image, labels_per_image)):
        t = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long),
            "image_id": torch.tensor(i),
        }
        if crowd_per_image is not None:
            t["iscrowd"] = torch.tensor(crowd_per_image[i], dtype=torch.long)
        samples.append((torch.zeros(3, 300, 300, dtype=torch.uint8), t))
    return collate_detection(samples)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_ssd300_has_8732_default_boxes_on_the_papers_maps(norm):
    backbone = VGG16Atrous("ssd300", width=0.125, norm=norm)
    maps = [tuple(f.shape[-2:]) for f in backbone(torch.zeros(2, 3, 300, 300))]
    assert maps == SSD300_MAPS
    priors = DefaultBoxGenerator("ssd300")((300, 300), maps)
    assert priors.boxes.shape == (8732, 4)
    assert priors.level_sizes == [38 * 38 * 4, 19 * 19 * 6, 10 * 10 * 6, 5 * 5 * 6, 3 * 3 * 4, 4]


def test_ssd512_adds_conv12_2():
    backbone = VGG16Atrous("ssd512", width=0.125)
    maps = [tuple(f.shape[-2:]) for f in backbone(torch.zeros(1, 3, 512, 512))]
    assert maps == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert DefaultBoxGenerator(
        "ssd512",
        scales=[0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
        aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
    )((512, 512), maps).boxes.shape == (24564, 4)


# SSD300's scales, worked by hand: conv4_3 at 0.1 (§3.1), eq. 4 from 0.2 to 0.9 over the other five layers in steps
# of 0.7/4, and one step further (1.075) for conv11_2's extra square √(s_6·s_7)
PAPER_SSD300_SCALES = [0.1, 0.2, 0.375, 0.55, 0.725, 0.9, 1.075]


def test_default_box_scales_follow_equation_4():
    m, s_min, s_max = 6, 0.2, 0.9
    expected = [s_min + (s_max - s_min) * (k - 1) / (m - 1) for k in range(1, m + 2)]
    assert default_box_scales(m, s_min, s_max) == pytest.approx(expected)
    # the paper's SSD300 (§3.1, "default box with scale 0.1 on conv4_3"): the formula over the other five layers
    assert default_box_scales(m, 0.2, 0.9, first_scale=0.1) == pytest.approx(PAPER_SSD300_SCALES)
    with pytest.raises(ValueError, match="at least 2 layers"):
        default_box_scales(1, first_scale=0.1)


def square_sides(priors: Priors, level: int, boxes_per_location: int) -> list[float]:
    """The first location's square boxes (w = h) on one level, as fractions of the 300 px image."""
    start = sum(priors.level_sizes[:level])
    wh = priors.boxes[start : start + boxes_per_location, 2:] - priors.boxes[start : start + boxes_per_location, :2]
    return [float(w) / 300 for w, h in wh.double() if abs(w - h) < 1e-4]


def test_composed_ssd300_puts_conv4_3_at_0_1_and_equation_4_on_the_other_layers():
    priors = instantiate(compose("model=ssd").model.priors)((300, 300), SSD300_MAPS)
    assert priors.level_sizes == [38 * 38 * 4, 19 * 19 * 6, 10 * 10 * 6, 5 * 5 * 6, 3 * 3 * 4, 4]
    # float32 corners of magnitude < 350 px (the widest box, conv11_2's ratio 2, is 0.9·√2·300 = 382 px about 150 px):
    # a width is two roundings, < 2·350·2⁻²⁴ px
    tol = 2 * 350 * 2.0**-24 / 300
    per_location = (4, 6, 6, 6, 4, 4)
    for k in range(6):  # each layer: s_k and the extra square √(s_k·s_{k+1})
        s, s_next = PAPER_SSD300_SCALES[k], PAPER_SSD300_SCALES[k + 1]
        assert square_sides(priors, k, per_location[k]) == pytest.approx([s, math.sqrt(s * s_next)], abs=tol)
    assert square_sides(priors, 0, 4)[0] * 300 == pytest.approx(30.0, abs=1e-3)  # 0.1 of 300 px on conv4_3


@pytest.mark.parametrize("recipe", ["ssd_cpu", "ssd_shapes"])
def test_cpu_recipes_keep_equation_4_over_all_six_layers_from_0_1(recipe):
    cfg = compose(f"experiment={recipe}")
    assert cfg.model.priors.first_scale is None and cfg.model.postprocess.topk_per_class == 200
    generator = instantiate(cfg.model.priors)
    assert generator.scales == pytest.approx([0.1 + 0.7 * k / 5 for k in range(7)])  # 0.1 … 0.8, then 0.94
    maps = [(16, 16), (8, 8), (4, 4), (2, 2)]  # their 4 source layers at 128 px
    before = DefaultBoxGenerator(
        "ssd300",
        num_prediction_layers=4,
        s_min=0.1,
        s_max=0.8,
        first_scale=None,  # conv4_3 by eq. 4 too, as the recipe always had it
    )((128, 128), maps)
    assert torch.equal(generator((128, 128), maps).boxes, before.boxes) and before.boxes.shape == (1560, 4)


def test_paper_default_boxes_shapes_and_centres():
    priors = DefaultBoxGenerator("ssd300")((300, 300), SSD300_MAPS)
    boxes = priors.boxes.double()
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    s = PAPER_SSD300_SCALES
    # the first location of conv7 (6 boxes): s, √(s·s'), then ratios 2, 1/2, 3, 1/3 (w = s√a, h = s/√a)
    first = wh[38 * 38 * 4 : 38 * 38 * 4 + 6] / 300
    a = torch.tensor([1, 1, 2, 0.5, 3, 1 / 3], dtype=torch.float64)
    scale = torch.tensor([s[1], math.sqrt(s[1] * s[2])] + [s[1]] * 4, dtype=torch.float64)
    torch.testing.assert_close(first, torch.stack((scale * a.sqrt(), scale / a.sqrt()), 1), atol=1e-5, rtol=0)
    # centres at ((i + 0.5)/|f_k|) of the image
    torch.testing.assert_close(
        centre[38 * 38 * 4], torch.tensor([0.5 / 19 * 300] * 2, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_torchvision_preset_equals_torchvision_default_boxes():
    cfg = compose("model=ssd_torchvision")
    ours = instantiate(cfg.model.priors)((300, 300), SSD300_MAPS)
    tv = TVDefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    images = ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)])
    theirs = tv(images, [torch.zeros(1, 1, h, w) for h, w in SSD300_MAPS])[0]
    torch.testing.assert_close(ours.boxes, theirs, atol=1e-3, rtol=0)


# Table 3's "# Boxes" for n = 6..1 source layers. The paper's, and ours (boxes a location, worked by hand):
# n = 4: conv9_2 6 + conv10_2's 4 + conv11_2's 4 = 14 → 38²·4 + 19²·6 + 10²·6 + 5²·14 = 8892;
# n = 3: conv8_2 6 + the square and extra square of conv9_2, conv10_2, conv11_2 (thinned to 5 % over) = 12 → 9142;
# n = 2: conv7 6 + one square each of conv8_2 … conv11_2 = 10 → 5776 + 19²·10 = 9386 (thinning stops at squares);
# n = 1: conv7 6 + conv4_3's 4, conv8_2's 4, conv9_2's 4, conv10_2's 4, conv11_2's 2 = 24 → 19²·24 = 8664.
# The paper states no tiling; no one rule gives its six counts (detectors.ssd.DefaultBoxGenerator says why).
PAPER_TABLE3_BOXES = {6: 8732, 5: 8764, 4: 8942, 3: 9864, 2: 9025, 1: 8664}
OUR_TABLE3_BOXES = {6: 8732, 5: 8764, 4: 8892, 3: 9142, 2: 9386, 1: 8664}


@pytest.mark.parametrize("n", range(1, 7))
def test_fewer_prediction_layers_keep_every_scale_and_about_8732_boxes(n):
    gen = DefaultBoxGenerator("ssd300", num_prediction_layers=n)
    assert len(gen.wh) == n
    assert gen.layers == (("conv7",) if n == 1 else SSD300_LAYERS[:n])  # paper Table 3's rows
    sides = dict(zip(SSD300_LAYERS, (38, 19, 10, 5, 3, 1)))
    total = sum(sides[name] ** 2 * len(wh) for name, wh in zip(gen.layers, gen.wh))
    assert total == OUR_TABLE3_BOXES[n]
    assert (total == PAPER_TABLE3_BOXES[n]) == (n in (6, 5, 1))  # the rows where ours is the paper's count
    assert 0.95 * 8732 <= total <= 1.1 * 8732  # "similar to the original (8732)"
    # every original layer's base scale s_k still has its square box somewhere
    squares = {round(w, 6) for wh in gen.wh for w, h in wh if abs(w - h) < 1e-9}
    assert all(round(s, 6) in squares for s in PAPER_SSD300_SCALES[:6])
    backbone = VGG16Atrous("ssd300", num_prediction_layers=n, width=0.125)
    feats = backbone(torch.zeros(1, 3, 300, 300))
    assert [tuple(f.shape[-2:]) for f in feats] == [(sides[layer], sides[layer]) for layer in gen.layers]
    assert [f.shape[1] for f in feats] == backbone.out_channels


def test_boundary_boxes_ignored_by_setting():
    keep = DefaultBoxGenerator("ssd300")((300, 300), SSD300_MAPS)
    drop = DefaultBoxGenerator("ssd300", boundary_boxes="ignore")((300, 300), SSD300_MAPS)
    crosses = (keep.boxes[:, :2] < -1e-3).any(1) | (keep.boxes[:, 2:] > 300 + 1e-3).any(1)
    assert keep.ignored is None and torch.equal(drop.ignored, crosses) and 0 < crosses.sum() < 8732
    batch = make_batch([[[0, 0, 150, 150]]], [[1]])
    labels = BestMatchIoUAssigner()(drop, batch, 3)["labels"][0]
    assert (labels[crosses] == IGNORE).all() and (labels[~crosses] != IGNORE).all()


def test_best_match_then_iou_assignment():
    priors = Priors(
        torch.tensor(
            [[0, 0, 10, 10], [0, 0, 12, 10], [40, 40, 60, 60], [100, 100, 120, 120], [200, 200, 230, 230]],
            dtype=torch.float32,
        ),
        [5],
    )
    # object 0 overlaps priors 0 (IoU 1) and 1 (IoU 10/12 > 0.5); object 1 has no prior above 0.5, keeps its
    # best (prior 2, IoU 0.25); the crowd box covers prior 3 exactly but never makes a positive: it is
    # background without crowd handling, ignored (no hard negative) with it
    batch = make_batch([[[0, 0, 10, 10], [40, 40, 80, 80], [100, 100, 120, 120]]], [[3, 1, 2]], [[0, 0, 1]])
    out = BestMatchIoUAssigner(0.5, crowd_ioa=None)(priors, batch, num_classes=4)
    assert out["labels"][0].tolist() == [3, 3, 1, 4, 4]
    assert BestMatchIoUAssigner(0.5)(priors, batch, num_classes=4)["labels"][0].tolist() == [3, 3, 1, IGNORE, 4]
    torch.testing.assert_close(out["boxes"][0, 2], torch.tensor([40.0, 40, 80, 80]))


def test_two_objects_claiming_one_prior_the_closer_keeps_it():
    priors = Priors(torch.tensor([[0, 0, 20, 20], [300, 300, 310, 310]], dtype=torch.float32), [2])
    batch = make_batch([[[0, 0, 18, 20], [0, 0, 40, 40]]], [[0, 1]])  # IoU 0.9 and 0.25 with prior 0
    out = BestMatchIoUAssigner(0.5)(priors, batch, num_classes=2)
    assert out["labels"][0].tolist() == [0, 2]


@pytest.mark.parametrize(("model", "bipartite"), [("ssd", True), ("ssd_torchvision", False)])
def test_composed_matching_is_multibox_bipartite_and_torchvision_as_torchvision(model, bipartite):
    """Both objects' best prior is prior 0 (IoU 0.9 and 0.69); object 1's next is prior 1 (0.4 < 0.5). The paper's
    config (§2.2: "as in MultiBox", bipartite) gives object 1 prior 1; torchvision's SSD config leaves it
    background, as torchvision's own Matcher does on the same IoUs."""
    priors = Priors(torch.tensor([[0, 0, 20, 20], [0, 0, 40, 36], [300, 300, 310, 310]], dtype=torch.float32), [3])
    batch = make_batch([[[0, 0, 18, 20], [0, 0, 24, 24]]], [[0, 1]])
    assigner = instantiate(compose(f"model={model}").model.assigner)
    labels = assigner(priors, batch, num_classes=2)["labels"][0].tolist()
    assert labels == ([0, 1, 2] if bipartite else [0, 2, 2])
    if not bipartite:
        from torchvision.models.detection._utils import Matcher
        from torchvision.ops import box_iou

        matches = Matcher(0.5, 0.5, allow_low_quality_matches=True)(box_iou(batch.boxes[0], priors.boxes))
        assert matches.tolist() == [0, -1, -1]


def reference_multibox_loss(logits, deltas, labels, gt_boxes, priors, ratio, min_neg, variances):
    """Paper eq. 1–3 written out with loops: per image, positives + the top (ratio × #pos) background boxes by
    confidence loss, summed, over the batch's N positives."""
    coder = BoxCoder(tuple(1 / v for v in variances))
    num_classes = logits.shape[-1] - 1
    conf, loc, n = 0.0, 0.0, 0
    for b in range(logits.shape[0]):
        pos = [i for i in range(logits.shape[1]) if 0 <= labels[b, i] < num_classes]
        bg = [i for i in range(logits.shape[1]) if labels[b, i] == num_classes]
        n += len(pos)
        for i in pos:
            conf = conf - F.log_softmax(logits[b, i], -1)[labels[b, i] + 1]
            target = coder.encode(gt_boxes[b, i], priors[i])
            for d in range(4):
                diff = (deltas[b, i, d] - target[d]).abs()
                loc = loc + (0.5 * diff**2 if diff < 1 else diff - 0.5)
        bg_losses = sorted(((-F.log_softmax(logits[b, i], -1)[0], i) for i in bg), key=lambda t: -t[0].item())
        k = min(max(int(ratio * len(pos)), min_neg), len(bg))
        for value, _ in bg_losses[:k]:
            conf = conf + value
    n = max(n, 1)
    return conf / n, loc / n


@pytest.mark.parametrize("min_negatives", [0, 3])
def test_multibox_loss_equals_the_papers_formula(min_negatives):
    g = torch.Generator().manual_seed(0)
    b, n, k = 3, 40, 4
    priors = torch.rand(n, 2, generator=g) * 100
    priors = torch.cat((priors, priors + 10 + torch.rand(n, 2, generator=g) * 30), 1)
    labels = torch.full((b, n), k)
    labels[0, :5] = torch.randint(0, k, (5,), generator=g)
    labels[1, 10:12] = torch.randint(0, k, (2,), generator=g)
    labels[1, 30:33] = IGNORE
    # image 2 has no positives: only min_negatives hard negatives
    gt = priors[None].expand(b, -1, -1) + torch.randn(b, n, 4, generator=g).clamp(-2, 2)
    logits = torch.randn(b, n, k + 1, generator=g, requires_grad=True)
    deltas = torch.randn(b, n, 4, generator=g, requires_grad=True)
    loss = MultiBoxLoss(neg_pos_ratio=3, min_negatives=min_negatives)
    ours = loss({"class_scores": logits, "box_deltas": deltas}, {"labels": labels, "boxes": gt}, Priors(priors, [n]))
    ref_cls, ref_box = reference_multibox_loss(
        logits, deltas, labels, gt, priors, 3, min_negatives, (0.1, 0.1, 0.2, 0.2)
    )
    torch.testing.assert_close(ours["loss_cls"], ref_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_box"], ref_box, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(ours["loss_cls"] + ours["loss_box"], (logits, deltas))
    want = torch.autograd.grad(ref_cls + ref_box, (logits, deltas))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    # image 2 (no positives) gets gradient on exactly min_negatives boxes
    assert (got[0][2].abs().sum(-1) > 0).sum() == min_negatives


def test_hard_negatives_never_exceed_the_background_boxes():
    # 3 positives want 9 negatives but only 2 background boxes exist: each counts once, ignored ones never
    labels = torch.tensor([[0, 1, 0, 2, 2, IGNORE]])
    logits = torch.randn(1, 6, 3, requires_grad=True)
    priors = Priors(torch.tensor([[0, 0, 10, 10]] * 6, dtype=torch.float32), [6])
    out = MultiBoxLoss()(
        {"class_scores": logits, "box_deltas": torch.zeros(1, 6, 4)},
        {"labels": labels, "boxes": priors.boxes[None]},
        priors,
    )
    target = torch.tensor([1, 2, 1, 0, 0])
    expected = F.cross_entropy(logits[0, :5], target, reduction="sum") / 3
    torch.testing.assert_close(out["loss_cls"], expected)


def test_vgg16_imagenet_weights_load_with_fc_subsampling(tmp_path):
    from torchvision.models import vgg16

    state = vgg16().state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    backbone = VGG16Atrous("ssd300")
    load_vgg16_weights(backbone, str(path))
    torch.testing.assert_close(backbone.features[21].weight, state["features.21.weight"])  # conv4_3
    torch.testing.assert_close(backbone.extra[0][5].weight, state["features.28.weight"])  # conv5_3
    conv6 = backbone.extra[0][7][1]
    torch.testing.assert_close(conv6.weight, state["classifier.0.weight"].view(4096, 512, 7, 7)[::4, :, ::3, ::3])
    assert conv6.dilation == (6, 6)
    with pytest.raises(ValueError, match="backbone.width=1.0 and backbone.norm=none"):
        VGG16Atrous("ssd300", width=0.5, weights=str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        VGG16Atrous("ssd300", weights=str(tmp_path / "missing.pth"))


# The claim is exact, so both networks run in float64: in float32, summation orders (NCHW or NHWC, the CPU's ISA)
# move boxes by ~2e-3 px on 0–255-scaled VGG activations and can swap near-tied detections. What is left is our
# postprocess's float32 decode (float32_box_atol) and float32 softmax (a few roundings of a value ≤ 1: 1e-6). The
# plain NCHW path is compared; channels-last equals it in float64 (tests/detectors/test_fast_paths.py).
@pytest.mark.slow
def test_imported_torchvision_weights_give_torchvision_detections():
    cfg = compose("model=ssd_torchvision", "model.channels_last=false")
    ours = instantiate(cfg.model).net.eval()
    theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=ours.num_classes + 1).eval()
    with torch.no_grad():  # xavier init saturates the softmax at 1.0 (ties); soften it so the order is defined
        for conv in theirs.head.classification_head.module_list:
            conv.weight.mul_(0.3)
    ours.load_state_dict(torchvision_ssd_state_dict(theirs.state_dict()), strict=True)
    g = torch.Generator().manual_seed(5)
    images = [torch.randint(0, 256, (3, 300, 300), generator=g, dtype=torch.uint8)]  # one: float64 VGG16 is slow
    got, expected = detections_in_float64(ours, theirs, images)
    assert_same_detections(
        got,
        expected,
        label_offset=1,
        min_detections=20,  # torchvision: background = 0
        box_atol=float32_box_atol(ours),
        score_atol=1e-6,
    )


def test_ssd_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="num_prediction_layers=7"):
        DefaultBoxGenerator("ssd300", num_prediction_layers=7)
    with pytest.raises(ValueError, match="priors.scales"):
        DefaultBoxGenerator("ssd300", scales=[0.1, 0.2])
    with pytest.raises(ValueError, match="boundary_boxes"):
        DefaultBoxGenerator("ssd300", boundary_boxes="drop")
    with pytest.raises(ValueError, match="backbone.variant"):
        VGG16Atrous("ssd1024")
    with pytest.raises(ValueError, match="backbone.norm"):
        VGG16Atrous("ssd300", norm="gn")


@pytest.mark.slow
def test_tiny_ssd_learns_a_fixed_batch():
    cfg = compose(
        "model=ssd",
        "model/optimizer=adamw",
        "model.optimizer.lr=0.001",
        "model.backbone.width=0.125",
        "model.num_prediction_layers=4",
        "data.image_size=128",
        "data.num_train=16",
        "data.train_transform.size=128",
    )  # the shapes' own size: the transform's 300 px took 27 s
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    batch = collate_detection([data.train_set[i] for i in range(8)])
    history = fit_fixed_batch(model, batch, 60)
    assert history[-1]["loss_cls"] < 0.5 * history[0]["loss_cls"]
    assert history[-1]["loss_box"] < 0.5 * history[0]["loss_box"]
    detections = model.net.eval().detect(batch)
    assert len(detections) == 8 and all(d["boxes"].shape[1] == 4 for d in detections)


@pytest.mark.parametrize("score_thresh", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("boundary", ["keep", "ignore"])
def test_fast_postprocess_equals_the_plain_one(score_thresh, boundary):
    priors = DefaultBoxGenerator("ssd300")((300, 300), SSD300_MAPS)
    n = priors.boxes.shape[0]
    g = torch.Generator().manual_seed(3)
    if boundary == "ignore":
        priors = Priors(priors.boxes, priors.level_sizes, ignored=torch.rand(n, generator=g) < 0.3)
    logits = torch.randn(3, n, 6, generator=g) * 2
    logits[..., 0] += 5.0  # mostly background, as a trained SSD
    logits[1, :50] = 0.0  # equal scores in every class
    deltas = torch.randn(3, n, 4, generator=g) * 0.5
    outputs, sizes = {"class_scores": logits, "box_deltas": deltas}, torch.tensor([[300, 300]] * 3)
    kw = dict(score_thresh=score_thresh, topk_per_class=100, nms_thresh=0.45, max_detections=50)
    fast = SSDPostprocess(**kw)(outputs, priors, sizes)
    plain = SSDPostprocess(**kw, fast=False)(outputs, priors, sizes)
    for f, p in zip(fast, plain, strict=True):
        assert len(p["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(f[key], p[key]), key


def test_inference_keeps_400_per_class_before_nms_and_200_per_image_after():
    cfg = compose("model=ssd")
    post = cfg.model.postprocess
    # released ssd_pascal.py: nms_param top_k 400, keep_top_k 200, confidence_threshold 0.01; §3.7: NMS 0.45
    assert (post.topk_per_class, post.max_detections, post.nms_thresh, post.score_thresh) == (400, 200, 0.45, 0.01)
    assert instantiate(post).topk_per_class == SSDPostprocess().topk_per_class == 400
    # 600 disjoint default boxes, every one a confident class-1 detection: NMS removes none, so what is left
    # is the per-class cap (400) or the per-image one
    corner = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij"), -1).reshape(-1, 2)
    boxes = torch.cat((corner * 10, corner * 10 + 8), 1)[:, [1, 0, 3, 2]]
    priors = Priors(boxes, [600])
    logits = torch.zeros(1, 600, 3)
    logits[..., 1] = 5.0 + torch.linspace(0, 1, 600)  # distinct scores: the top-k is defined
    outputs = {"class_scores": logits, "box_deltas": torch.zeros(1, 600, 4)}
    sizes = torch.tensor([[200, 300]])
    for max_detections, expected in ((1000, 400), (200, 200)):
        kept = SSDPostprocess(topk_per_class=400, max_detections=max_detections)(outputs, priors, sizes)[0]
        assert len(kept["scores"]) == expected and (kept["labels"] == 0).all()
        # the best `expected` boxes (the last ones), best first; zero offsets decode to the box, up to float32
        # roundings of coordinates ≤ 300 px
        atol = FLOAT32_ROUNDINGS_IN_DECODE * 2.0**-24 * 300
        torch.testing.assert_close(kept["boxes"], boxes.flip(0)[:expected], atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "train_difficult"),
    [
        (("experiment=ssd300_voc0712", "data.root=/data"), True),  # released ssd_pascal.py: train_on_diff_gt = True
        (("experiment=ssd512_voc0712", "data.root=/data"), True),
        (("experiment=ssd_cpu", "data=voc", "data.root=/data"), False),  # data/voc.yaml's default, unchanged
    ],
)
def test_ssd_voc_recipes_train_on_difficult_objects_as_the_released_code(overrides, train_difficult):
    cfg = compose(*overrides)
    assert cfg.data.train_difficult is train_difficult


def test_composed_ssd300_builds_the_papers_l2norm_matching_and_loss_constants():
    """``conf/model/ssd.yaml``'s paper values reach the parts it builds: conv4_3's L2Norm scale 20 (§3.1), matching
    above IoU 0.5 after each object's best box (§2.2), hard negatives 3:1 (§2.2) and α = 1 (eq. 1)."""
    cfg = compose("model=ssd", "model.backbone.width=0.125")
    model = cfg.model
    assert (model.backbone.l2norm_scale, model.assigner.pos_iou) == (20, 0.5)
    assert (model.loss.neg_pos_ratio, model.loss.alpha) == (3, 1)
    net = instantiate(model).net
    # L2Norm: every channel's scale starts at 20, so each location of conv4_3 leaves with norm 20
    assert torch.equal(net.backbone.l2norm.weight.detach(), torch.full_like(net.backbone.l2norm.weight, 20.0))
    conv4_3 = net.backbone(torch.rand(1, 3, 300, 300, generator=torch.Generator().manual_seed(0)))[0]
    norms = conv4_3.detach().norm(dim=1).flatten()
    assert norms.min() > 0  # no location all zero after the ReLU, where F.normalize would leave 0
    torch.testing.assert_close(norms, torch.full_like(norms, 20.0))
    # matching: the object's best box (IoU 1), a box at IoU 10/19 > 0.5 positive, one at 10/21 < 0.5 background
    priors = Priors(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 19], [0, 0, 10, 21]], dtype=torch.float32), [3])
    assert net.assigner(priors, make_batch([[[0, 0, 10, 10]]], [[1]]), 2)["labels"][0].tolist() == [1, 1, 2]
    # the loss: eq. 1 with α = 1 and 3:1 hard negatives, the paper's formula written as loops
    g = torch.Generator().manual_seed(0)
    b, n, k = 2, 30, 3
    boxes = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat((boxes, boxes + 10 + torch.rand(n, 2, generator=g) * 30), 1)
    labels = torch.full((b, n), k)
    labels[0, :2], labels[1, 5:8] = 0, 2  # 2 and 3 positives: 6 and 9 hard negatives of 28 and 27
    gt = boxes[None].expand(b, -1, -1) + torch.randn(b, n, 4, generator=g).clamp(-2, 2)
    logits, deltas = torch.randn(b, n, k + 1, generator=g), torch.randn(b, n, 4, generator=g)
    ours = net.loss({"class_scores": logits, "box_deltas": deltas}, {"labels": labels, "boxes": gt}, Priors(boxes, [n]))
    ref_cls, ref_box = reference_multibox_loss(logits, deltas, labels, gt, boxes, 3, 0, (0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(ours["loss_cls"], ref_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_box"], ref_box, rtol=1e-5, atol=1e-6)
