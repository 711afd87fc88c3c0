"""The training-speed switches change no result: folded frozen BatchNorm (``backbone.fold_frozen_bn``),
channels-last activations (``model.channels_last``), RetinaNet's box subnet run only around the positives
(``model.head.sparse_box_training``) and the compiled parts (``compile=true``) give the plain formulation's values
and gradients, on the CPU and (``pytest -m cuda``) on the GPU.

Compared in float64, where a reordered sum differs by ~1e-15, so any real difference in the formula shows (channels
last on the GPU excepted: see CHANNELS_LAST_DTYPE)."""

from copy import deepcopy

import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch._dynamo.utils import counters
from torchvision.ops import FrozenBatchNorm2d

from bench.training_step import random_samples
from detectors.backbones import ConvFrozenBN2d, FoldedFrozenBatchNorm2d, ResNetFPN, build_resnet
from detectors.batch import collate_detection
from detectors.retinanet import RetinaNetHead
from detectors.yolo import ResponsiblePredictorAssigner

from ..conftest import DEVICES, TINY, compose


def _randomise_frozen_statistics(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _values_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad()
    outputs = model(x)
    sum((o.square().mean() for o in outputs), x.new_zeros(())).backward()
    return [o.detach() for o in outputs], {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable_layers", [5, 3])
def test_folded_frozen_batchnorm_equals_conv_then_batchnorm(trainable_layers, device):
    kwargs = dict(depth=18, out_channels=32, norm="frozen_bn", trainable_layers=trainable_layers)
    plain, folded = ResNetFPN(fold_frozen_bn=False, **kwargs).double(), ResNetFPN(**kwargs).double()
    _randomise_frozen_statistics(plain, seed=1)
    assert plain.state_dict().keys() == folded.state_dict().keys()  # checkpoints load either way
    folded.load_state_dict(plain.state_dict())  # updates the folded BNs' buffers in place: the fold follows
    plain, folded = plain.to(device), folded.to(device)  # and follows them to the device
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, ConvFrozenBN2d) for m in folded.modules()) == frozen == 20  # stem + 8×2 + 3 downsample
    assert sum(isinstance(m, FoldedFrozenBatchNorm2d) for m in folded.modules()) == frozen
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == [
        n for n, p in folded.named_parameters() if p.requires_grad
    ]

    x = torch.randn(2, 3, 96, 128, dtype=torch.float64).to(device).requires_grad_()
    want, want_grads = _values_and_grads(plain, x)
    want_x = x.grad.clone()
    x.grad = None
    got, got_grads = _values_and_grads(folded, x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    _assert_same_gradients(got_grads, want_grads)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-9, atol=1e-12)


def _assert_same_gradients(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-7, atol: float = 1e-10
) -> None:
    """Equal to float64 rounding (and the float32 losses' own), ``atol`` relative to the largest gradient (a conv bias
    before training-mode BN has an exactly-zero gradient in exact arithmetic, so only rounding noise to compare
    there)."""
    assert got.keys() == want.keys() and len(want) > 10
    scale = max(float(w.abs().max()) for w in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol * scale, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_detections(got: list, want: list, score_atol: float, box_atol: float) -> None:
    """Per image the same detections up to the order of scores within ``score_atol`` of each other, which rounding
    may swap (an untrained RetinaNet's scores lie ~1e-7 apart): the same scores, best first, and each detection of
    either list has a twin in the other, of the same label, score and box (``box_atol`` px)."""
    assert sum(len(d["scores"]) for d in want) > 0
    for g, w in zip(got, want, strict=True):
        assert len(g["scores"]) == len(w["scores"])
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=score_atol)
        twin = (
            (g["labels"][:, None] == w["labels"][None])
            & ((g["scores"][:, None] - w["scores"][None]).abs() <= score_atol)
            & ((g["boxes"][:, None] - w["boxes"][None]).abs().amax(-1) <= box_atol)
        )
        assert bool(twin.any(1).all()) and bool(twin.any(0).all())


def test_folding_applies_only_to_frozen_batchnorm():
    for kwargs in ({"norm": "bn"}, {"norm": "frozen_bn", "fold_frozen_bn": False}):
        assert not any(isinstance(m, ConvFrozenBN2d) for m in build_resnet(18, **kwargs).modules())
    # a copy (DDP replicas, EMA, Lightning's checkpoint averaging) keeps each conv with its own BN
    net = build_resnet(18, norm="frozen_bn")
    copy = deepcopy(net)
    assert copy.conv1._frozen_bn is copy.bn1 and copy.bn1 is not net.bn1


SHAPES = {
    "retinanet": ("experiment=retinanet_shapes", "model.backbone.norm=frozen_bn"),
    "ssd": ("experiment=ssd_shapes",),
    "yolo": ("experiment=yolo_shapes",),
}


# NHWC on the GPU means cuDNN's NHWC kernels, which never run in float64 (PyTorch keeps double convolutions NCHW):
# there the layouts are compared in float32, TF32 off
CHANNELS_LAST_DTYPE = {"cpu": torch.float64, "cuda": torch.float32}
# float32: NHWC and NCHW convolutions sum in different orders (~2^-24·√fan-in relative each), which the GroupNorm
# after RetinaNet's σ=0.01 head convolutions magnifies in its backward: measured in float32 on the CPU, losses 6e-6
# apart, gradients 2.4e-3 of the largest (SSD, YOLO 2e-5), scores 4e-6, boxes 6e-4 px. The bounds below leave ~10×
# for the GPU's other convolution algorithms; a layout mistake moves these by O(1)
CHANNELS_LAST_TOLERANCES = {  # losses (rtol), gradients (rtol, atol × the largest), scores, boxes (px)
    torch.float64: (1e-6, (1e-7, 1e-10), 1e-6, 1e-4),  # losses, scores, boxes: float32 from float64 outputs
    torch.float32: (1e-4, (1e-2, 2e-2), 1e-4, 1e-2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_channels_last_gives_the_same_losses_gradients_and_detections(name, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions in float32
    dtype = CHANNELS_LAST_DTYPE[device]
    loss_rtol, grad_tolerances, score_atol, box_atol = CHANNELS_LAST_TOLERANCES[dtype]
    cfg = compose(*SHAPES[name], "model.postprocess.score_thresh=0.001")  # an untrained model's scores are low
    size, classes = cfg.data.image_size, len(cfg.data.classes)
    samples = random_samples(2, size, classes, objects=3, min_box=size / 8, max_box=size / 2, seed=0)
    batch = move_data_to_device(collate_detection(samples, 32), device)
    results, models = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = instantiate(cfg.model, channels_last=channels_last).net.to(device, dtype)
        if name == "yolo":
            model.eval()  # dropout draws differ with the layout
        losses = model.compute_losses(batch)
        sum(losses.values()).backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        # the weights NHWC as well (no reorder per call), and so their gradients and the optimizer's state
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert all(p.is_contiguous(memory_format=layout) for p in model.parameters() if p.dim() == 4)
        assert all(g.is_contiguous(memory_format=layout) for g in grads.values() if g.dim() == 4)
        model.eval()
        results.append((losses, grads, model.detect(batch)))
        models.append(model)
    (plain_losses, plain_grads, plain_dets), (losses, grads, dets) = results
    models[1].load_state_dict(models[0].state_dict())  # an NCHW checkpoint loads into NHWC weights, kept NHWC
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in models[1].parameters() if p.dim() == 4)
    for k in plain_losses:  # the losses run in float32 (as under mixed precision)
        torch.testing.assert_close(losses[k], plain_losses[k], rtol=loss_rtol, atol=0)
    _assert_same_gradients(grads, plain_grads, *grad_tolerances)
    _assert_same_detections(dets, plain_dets, score_atol, box_atol)


SPARSE_SIZES = [(41, 27), (21, 14), (11, 7), (6, 4), (3, 2)]  # odd sizes: tiles cross every level's edge


def _sparse_head(norm: str = "none", device: str = "cpu") -> RetinaNetHead:
    head = RetinaNetHead(8, num_classes=5, num_anchors=3, norm=norm).double()
    with torch.no_grad():  # σ=0.01 would leave the deeper layers' values near their biases
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head.to(device)


def _features(batch: int = 2, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 8, h, w, generator=g, dtype=torch.float64).to(device).requires_grad_()
        for h, w in SPARSE_SIZES
    ]


def _box_grads(deltas: torch.Tensor, needed: torch.Tensor, head: RetinaNetHead, features: list[torch.Tensor]):
    weights = torch.linspace(-1, 1, int(needed.sum()) * 4, dtype=torch.float64, device=deltas.device).view(-1, 4)
    loss = (deltas[needed] * weights).sum()  # reads only the needed anchors, as the box loss does
    params = [p for n, p in head.named_parameters() if n.startswith("box")]
    return torch.autograd.grad(loss, params + features)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_box_deltas_equal_the_dense_ones_where_needed(device):
    head, features = _sparse_head(device=device), _features(device=device)
    n = 3 * sum(h * w for h, w in SPARSE_SIZES)
    g = torch.Generator().manual_seed(1)
    needed = torch.rand(2, n, generator=g) < 0.002
    needed[0, 0] = needed[1, 3 * 41 * 27 - 1] = needed[1, -1] = True  # corners of the first and last levels
    needed = needed.to(device)
    dense, sparse = head.box_deltas(features), head.box_deltas_where(features, needed)
    assert sparse.shape == dense.shape
    assert bool((sparse == 0).all(-1).any())  # the tile path ran: not every anchor was computed
    torch.testing.assert_close(sparse[needed], dense[needed], rtol=1e-12, atol=1e-12)
    computed = (sparse != 0).any(-1)
    assert bool(needed[computed].any()) and bool((needed <= computed).all())  # only whole tiles beside them
    torch.testing.assert_close(sparse[computed], dense[computed], rtol=1e-12, atol=1e-12)
    for got, want in zip(
        _box_grads(sparse, needed, head, features), _box_grads(dense, needed, head, features), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_box_deltas_run_whole_maps_when_crowded_and_keep_the_graph_when_empty(device):
    head, features = _sparse_head(device=device), _features(device=device)
    n = 3 * sum(h * w for h, w in SPARSE_SIZES)
    everywhere = torch.ones(2, n, dtype=torch.bool, device=device)
    assert torch.equal(head.box_deltas_where(features, everywhere), head.box_deltas(features))
    nowhere = torch.zeros(2, n, dtype=torch.bool, device=device)
    deltas = head.box_deltas_where(features, nowhere)
    deltas[nowhere].sum().backward()  # no positives: DDP still needs every box parameter in the graph
    assert all(p.grad is not None for n_, p in head.named_parameters() if n_.startswith("box"))


def test_sparse_box_training_only_without_groupnorm_and_its_switch():
    assert _sparse_head().sparse_box_training and not _sparse_head("gn").sparse_box_training
    cfg = compose("model=retinanet", "data=shapes")
    assert cfg.model.head.sparse_box_training is True
    assert instantiate(compose(*TINY, "model.head.norm=none").model).net.sparse_box_training
    assert not instantiate(
        compose(*TINY, "model.head.norm=none", "model.head.sparse_box_training=false").model
    ).net.sparse_box_training
    assert not instantiate(compose(*TINY).model).net.sparse_box_training  # make train's GroupNorm head
    model = instantiate(compose(*TINY, "model.head.norm=none").model).net
    model.assigner = ResponsiblePredictorAssigner()  # an assignment by the predicted boxes must see them all
    assert not model.sparse_box_training


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_box_training_gives_the_dense_losses_and_gradients(monkeypatch, device):
    # 320 px: P3 is 40×40, where two small objects' tiles are a fraction of the map
    cfg = compose(*TINY, "model.head.norm=none", "data.image_size=320", "model.priors.size_factor=0.5")
    size, classes = cfg.data.image_size, len(cfg.data.classes)
    batch = move_data_to_device(collate_detection(random_samples(2, size, classes, 2, 16, 48, seed=0), 32), device)
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = instantiate(cfg.model).net.to(device, torch.float64)
        assert model.sparse_box_training
        model.head.sparse_box_training = sparse
        dense_calls = []
        monkeypatch.setattr(
            model.head, "box_deltas", lambda f, m=model: dense_calls.append(1) or RetinaNetHead.box_deltas(m.head, f)
        )
        losses = model.compute_losses(batch)
        assert len(dense_calls) == (0 if sparse else 1)  # the sparse run never computed the whole maps
        sum(losses.values()).backward()
        results.append((losses, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (dense_losses, dense_grads), (losses, grads) = results
    for k in dense_losses:
        torch.testing.assert_close(losses[k], dense_losses[k], rtol=1e-12, atol=0)
    _assert_same_gradients(grads, dense_grads)


def test_compile_parts_compiles_what_the_sparse_training_path_runs():
    """``compile=true`` compiles the parts, not the module's forward, which the sparse box path never calls."""
    cfg = compose(*TINY, "model.head.norm=none", "data.image_size=320", "model.priors.size_factor=0.5")
    batch = collate_detection(random_samples(2, 320, len(cfg.data.classes), 2, 16, 48, seed=0), 32)
    torch.manual_seed(0)
    model = instantiate(cfg.model).net
    eager = model.compute_losses(batch)
    graphs = []

    def record(graph, example_inputs):  # a torch.compile backend: notes each captured graph, runs it as it is
        inputs = " ".join(n.name for n in graph.graph.nodes if n.op == "placeholder")
        convs = sum(n.op == "call_function" and "conv2d" in str(n.target) for n in graph.graph.nodes)
        graphs.append(("body" in inputs, convs))
        return graph.forward

    model.compile_parts(backend=record)
    assert set(model.state_dict()) == set(instantiate(cfg.model).net.state_dict())  # checkpoints keep their keys
    compiled = model.compute_losses(batch)
    assert model.sparse_box_training
    assert any(backbone and convs >= 20 for backbone, convs in graphs)  # ResNet-18's convolutions, in one graph
    assert (False, cfg.model.head.num_convs) in graphs  # the class subnet's convolutions, without the head's forward
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=0)


def _losses_and_grads(model: torch.nn.Module, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad()
    losses = model.compute_losses(batch)
    sum(losses.values()).backward()
    return losses, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# Inductor on the CPU generates and compiles C++ (4 minutes on 2 busy cores with a cold cache): there the graphs go
# through AOTAutograd and run eagerly (aot_eager), the capture and its autograd checked; the GPU case is Inductor's
COMPILE_BACKEND = {"cpu": "aot_eager", "cuda": "inductor"}


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_parts_give_the_eager_losses_and_gradients(device):
    """``compile_parts()`` (train.py's ``compile=true``): the losses and gradients of eager mode, on the sparse box
    path it was made for; on the GPU with torch.compile's own backend, Inductor."""
    # 256 px: every level ≥ 2×2, so the head's parts compile once static, once with dynamic sizes, under the recompile
    # limit (a 1×1 level adds a size-1 specialisation per part, and the later parts would fall back to eager)
    cfg = compose(*TINY, "model.head.norm=none", "data.image_size=256", "model.priors.size_factor=0.5")
    batch = collate_detection(random_samples(2, 256, len(cfg.data.classes), 2, 16, 48, seed=0), 32)
    batch = move_data_to_device(batch, device)
    torch.manual_seed(0)
    eager = instantiate(cfg.model).net.to(device, torch.float64)
    compiled = deepcopy(eager)
    torch._dynamo.reset()  # nn.Module.compile's parts share one frame: no other test's entries towards its limit
    counters.clear()
    compiled.compile_parts(backend=COMPILE_BACKEND[device])
    want_losses, want_grads = _losses_and_grads(eager, batch)
    for _ in range(2):  # the step that compiles, then one that runs what it compiled
        losses, grads = _losses_and_grads(compiled, batch)
    assert compiled.sparse_box_training and counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()
    for k in want_losses:  # float32 losses of float64 networks, whose fused kernels round apart by ~1e-16
        torch.testing.assert_close(losses[k], want_losses[k], rtol=1e-6, atol=0)
    _assert_same_gradients(grads, want_grads)
