"""RetinaNet's constants (Lin et al. 2017, "Focal Loss for Dense Object Detection"; Detectron's core/config.py where
the paper gives none): each a default of conf/model/retinanet.yaml with its citation, kept by the paper's recipe, and
what the parts built from them do: the head's initialisation (§4.1), P6 from C5 (§4 footnote 2), the anchors (§4),
the assignment thresholds (§4) and the warm-up and steps (§4.1, Detectron)."""

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from detectors.backbones import ResNetFPN, stage_channels
from detectors.assigners import IGNORE
from detectors.batch import collate_detection
from detectors.priors import Priors
from detectors.retinanet import RetinaNetHead
from engine.detection_module import warmup_multistep

from ..conftest import compose

MODEL_YAML = Path(__file__).resolve().parents[2] / "conf" / "model" / "retinanet.yaml"
PAPER_RECIPE = ("experiment=retinanet_r50_coco_1x", "data.root=/data")

# key under `model` → value, written here from the paper (and Detectron's defaults where it gives none)
CONSTANTS = {
    "backbone.depth": 50,  # §4.1 "Initialization": ResNet-50-FPN, the backbone of every ablation (Table 1)
    "backbone.out_channels": 256,  # §4: all pyramid levels have C = 256 channels
    "backbone.p6_source": "c5",  # §4 footnote 2: P6 via a 3×3 stride-2 conv on C5
    "priors.sizes": [32, 64, 128, 256, 512],  # §4 "Anchors": areas 32² to 512² on P3 to P7
    "priors.scales_per_octave": 3,  # §4: sizes {2^0, 2^(1/3), 2^(2/3)}
    "priors.aspect_ratios": [0.5, 1.0, 2.0],  # §4: {1:2, 1:1, 2:1}
    "head.num_convs": 4,  # §4 "Classification Subnet": four 3×3 conv layers
    "head.prior_probability": 0.01,  # §4.1 "Initialization": π = .01
    "head.norm": "none",  # §4: each conv followed by ReLU, nothing else
    "assigner.pos_iou": 0.5,  # §4 "Anchors": foreground at IoU ≥ 0.5
    "assigner.neg_iou": 0.4,  # §4: background at IoU in [0, 0.4)
    "loss.gamma": 2.0,  # §4.1 "Focal Loss", §5.1: γ = 2
    "loss.alpha": 0.25,  # §5.1: α = .25 with γ = 2
    "loss.box_loss": "smooth_l1",  # §4.1 "Optimization": the standard smooth L1 loss
    "loss.smooth_l1_beta": 0.11,  # Detectron RETINANET.BBOX_REG_BETA
    "postprocess.score_thresh": 0.05,  # §4.1 "Inference": confidence thresholded at 0.05
    "postprocess.topk_per_level": 1000,  # §4.1: at most 1k top-scoring predictions per FPN level
    "postprocess.nms_thresh": 0.5,  # §4.1: NMS with a threshold of 0.5
    "postprocess.max_detections": 100,  # Detectron TEST.DETECTIONS_PER_IM
    "optimizer.lr": 0.01,  # §4.1 "Optimization": 0.01 at 16 images a batch
    "optimizer.weight_decay": 0.0001,  # §4.1
    "scheduler.milestones": [60000, 80000],  # §4.1: ÷10 at 60k and 80k iterations
    "scheduler.gamma": 0.1,  # §4.1
    "scheduler.warmup_steps": 500,  # Detectron SOLVER.WARM_UP_ITERS (the paper states no warm-up)
    "scheduler.warmup_factor": 1 / 3,  # Detectron SOLVER.WARM_UP_FACTOR
}


@pytest.mark.parametrize("overrides", [(), PAPER_RECIPE], ids=["model_default", "paper_recipe"])
@pytest.mark.parametrize("key", CONSTANTS)
def test_config_holds_the_papers_constants(key, overrides):
    cfg = compose(*overrides)
    value = OmegaConf.select(cfg.model, key, throw_on_missing=True)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert value == CONSTANTS[key] and type(value) is type(CONSTANTS[key]), f"model.{key} = {value!r}"


def test_sgd_momentum_is_the_papers():
    assert compose(*PAPER_RECIPE).model.optimizer.momentum == 0.9  # §4.1 "Optimization"


def yaml_line(key: str) -> str:
    """The line of conf/model/retinanet.yaml that sets `key` (section.name), searched inside its section."""
    section, name = key.split(".")
    lines = MODEL_YAML.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{section}:")))
    for line in lines[start + 1 :]:
        if re.match(r"^\S", line):  # the next top-level key: the section ended
            break
        if re.match(rf"^\s+{name}:", line):
            return line
    raise AssertionError(f"{key}: not set in {MODEL_YAML.name}")


@pytest.mark.parametrize("key", CONSTANTS)
def test_every_constant_cites_the_paper_or_detectron(key):
    comment = yaml_line(key).partition("#")[2]
    assert re.search(r"§\d|Detectron", comment), f"model.{key}: no citation in its comment {comment!r}"


# --- what the built parts do with them ------------------------------------------------------------------------


def paper_head() -> RetinaNetHead:
    cfg = compose(*PAPER_RECIPE).model
    anchors = instantiate(cfg.priors).num_anchors_per_location
    return instantiate(cfg.head)(in_channels=cfg.backbone.out_channels, num_anchors=anchors)


def test_head_has_the_papers_subnets():
    head = paper_head()  # COCO: K = 80; A = 9; C = 256
    for subnet in (head.cls_subnet, head.box_subnet):  # four 3×3 convs of C filters, each followed by ReLU
        assert [type(m) for m in subnet] == [nn.Conv2d, nn.ReLU] * 4
        assert all(c.kernel_size == (3, 3) and c.in_channels == c.out_channels == 256 for c in subnet[::2])
    assert head.cls_score.kernel_size == head.box_pred.kernel_size == (3, 3)
    assert (head.cls_score.out_channels, head.box_pred.out_channels) == (80 * 9, 4 * 9)  # KA and 4A
    assert head.cls_subnet[0] is not head.box_subnet[0]  # not shared between the subnets


def test_head_initialisation_follows_section_4_1():
    """Every conv layer: Gaussian weights, σ = 0.01; biases 0 but the classification layer's, −log((1 − π)/π)."""
    head, sigma, pi = paper_head(), 0.01, 0.01
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 * 4 + 2
    # P(|w| < σ) for a Gaussian, erf(1/√2); a uniform fill of the same σ gives 1/√3 = 0.577
    inside_one_sigma = math.erf(1 / math.sqrt(2))
    for conv in convs:
        w = conv.weight.detach().double().flatten()
        n = w.numel()  # ≥ 82,944 (the box layer's 256·36·9)
        # standard errors over n draws of N(0, σ²): the sample σ's σ/√(2n), the mean's σ/√n, a fraction's
        # √(p(1−p)/n); 6 of them: a correct fill fails by chance with odds below 1e-8 (a 10 % wrong σ is 25 out)
        assert abs(w.std().item() / sigma - 1) < 6 / math.sqrt(2 * n)
        assert abs(w.mean().item()) < 6 * sigma / math.sqrt(n)
        inside = (w.abs() < sigma).double().mean().item()
        assert abs(inside - inside_one_sigma) < 6 * math.sqrt(inside_one_sigma * (1 - inside_one_sigma) / n)
        if conv is not head.cls_score:
            assert torch.count_nonzero(conv.bias) == 0
    bias = head.cls_score.bias.detach()
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log((1 - pi) / pi)), rtol=0, atol=1e-6)
    # so every anchor starts at foreground probability π for every class
    torch.testing.assert_close(torch.sigmoid(bias.double()), torch.full(bias.shape, pi, dtype=torch.float64))


@pytest.mark.parametrize("source", ["c5", "p5"])
def test_p6_is_a_3x3_stride_2_conv_on_c5(source):
    """§4 footnote 2: P6 from C5 (p6_source=c5, the default), P7 = 3×3 stride-2 conv on ReLU(P6); p5 is
    torchvision's variant. C5 has 128 channels here and the pyramid 32: taking P6 from P5 cannot pass for c5."""
    assert inspect.signature(ResNetFPN).parameters["p6_source"].default == "c5"
    depth, width, channels = 18, 0.25, 32
    fpn = ResNetFPN(depth=depth, width=width, out_channels=channels, p6_source=source).eval()
    p6, p7 = fpn.fpn.extra_blocks.p6, fpn.fpn.extra_blocks.p7
    c5_channels = stage_channels(depth, width)[2]
    assert c5_channels == 128 != channels
    assert p6.in_channels == (c5_channels if source == "c5" else channels) and p6.out_channels == channels
    assert (p6.kernel_size, p6.stride, p6.padding) == ((3, 3), (2, 2), (1, 1))
    with torch.no_grad():
        c = fpn.body(torch.randn(1, 3, 128, 128))
        p = list(fpn.fpn(c).values())
        source_map = c["2"] if source == "c5" else p[2]  # C5, or P5
        torch.testing.assert_close(p[3], F.conv2d(source_map, p6.weight, p6.bias, stride=2, padding=1))
        torch.testing.assert_close(p[4], F.conv2d(F.relu(p[3]), p7.weight, p7.bias, stride=2, padding=1))
    assert [t.shape[-1] for t in p] == [128 // s for s in fpn.strides] == [16, 8, 4, 2, 1]  # P3–P7


def test_anchors_are_nine_a_cell_from_32_to_813_px_on_p3_to_p7():
    """§4 "Anchors": on P3..P7 sizes 32·2^l · {2^0, 2^(1/3), 2^(2/3)} at ratios {1:2, 1:1, 2:1}, A = 9, covering
    "the scale range 32 - 813 pixels" (512·2^(2/3) = 812.7)."""
    generator = instantiate(compose(*PAPER_RECIPE).model.priors)
    assert generator.num_anchors_per_location == 9
    strides, size = (8, 16, 32, 64, 128), 1024
    priors = generator((size, size), [(size // s, size // s) for s in strides])
    assert priors.level_sizes == [9 * (size // s) ** 2 for s in strides]
    starts = [0] + torch.tensor(priors.level_sizes).cumsum(0).tolist()[:-1]
    sides = []
    for level, start in enumerate(starts):
        cell = priors.boxes[start : start + 9].double()  # one cell's anchors
        w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
        expected = sorted(32 * 2**level * 2 ** (k / 3) for k in range(3) for _ in range(3))
        torch.testing.assert_close((w * h).sqrt().sort().values, torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close((h / w).sort().values, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3).double())
        sides += (w * h).sqrt().tolist()
    assert round(min(sides)) == 32 and round(max(sides)) == 813


def test_assignment_thresholds_split_at_0_5_and_0_4():
    """§4: IoU ≥ 0.5 foreground, [0.4, 0.5) ignored, [0, 0.4) background (the assigner built from the config)."""
    assigner = instantiate(compose(*PAPER_RECIPE).model.assigner)
    # IoU with the object [0, 0, 10, 10]: 1, 0.5 exactly, 10/22 = 0.45, 10/26 = 0.38
    priors = Priors(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 22], [0, 0, 10, 26.0]]), [4])
    target = {"boxes": torch.tensor([[0, 0, 10, 10.0]]), "labels": torch.tensor([3]), "image_id": torch.tensor(0)}
    batch = collate_detection([(torch.zeros(3, 64, 64, dtype=torch.uint8), target)])
    labels = assigner(priors, batch, num_classes=5)["labels"][0].tolist()
    assert labels == [3, 3, IGNORE, 5]  # positive, positive, ignored, background (5 = K)


def test_paper_recipe_warms_up_from_a_third_over_500_steps_then_steps_at_60k_and_80k():
    """Detectron's defaults (the paper states no warm-up): linear from lr/3 over 500 iterations, computed here as
    Detectron's lr_policy does; then §4.1's ÷10 at 60k and 80k."""
    multiplier = warmup_multistep(**compose(*PAPER_RECIPE).model.scheduler)
    for step in (0, 100, 250, 499):
        alpha = step / 500
        assert multiplier(step) == pytest.approx((1 / 3) * (1 - alpha) + alpha, rel=1e-12)
    assert [multiplier(s) for s in (500, 59999)] == [1.0, 1.0]
    assert multiplier(60000) == pytest.approx(0.1) and multiplier(80000) == pytest.approx(0.01)
