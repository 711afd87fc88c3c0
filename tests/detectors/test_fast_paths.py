"""The training-speed switches change no result: folded frozen BatchNorm (``backbone.fold_frozen_bn``),
channels-last activations (``model.channels_last``) and RetinaNet's box subnet run only around the positives
(``model.head.sparse_box_training``) give the plain formulation's values and gradients.

Compared in float64, where a reordered sum differs by ~1e-15, so any real difference in the formula shows."""

from copy import deepcopy

import pytest
import torch
from hydra.utils import instantiate
from torchvision.ops import FrozenBatchNorm2d

from bench.training_step import random_samples
from detectors.backbones import ConvFrozenBN2d, FoldedFrozenBatchNorm2d, ResNetFPN, build_resnet
from detectors.batch import collate_detection
from detectors.retinanet import RetinaNetHead
from detectors.yolo import ResponsiblePredictorAssigner

from ..conftest import TINY, compose


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
    sum((o.square().mean() for o in outputs), torch.zeros(())).backward()
    return [o.detach() for o in outputs], {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("trainable_layers", [5, 3])
def test_folded_frozen_batchnorm_equals_conv_then_batchnorm(trainable_layers):
    kwargs = dict(depth=18, out_channels=32, norm="frozen_bn", trainable_layers=trainable_layers)
    plain, folded = ResNetFPN(fold_frozen_bn=False, **kwargs).double(), ResNetFPN(**kwargs).double()
    _randomise_frozen_statistics(plain, seed=1)
    assert plain.state_dict().keys() == folded.state_dict().keys()  # checkpoints load either way
    folded.load_state_dict(plain.state_dict())  # updates the folded BNs' buffers in place: the fold follows
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, ConvFrozenBN2d) for m in folded.modules()) == frozen == 20  # stem + 8×2 + 3 downsample
    assert sum(isinstance(m, FoldedFrozenBatchNorm2d) for m in folded.modules()) == frozen
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == [
        n for n, p in folded.named_parameters() if p.requires_grad
    ]

    x = torch.randn(2, 3, 96, 128, dtype=torch.float64, requires_grad=True)
    want, want_grads = _values_and_grads(plain, x)
    want_x = x.grad.clone()
    x.grad = None
    got, got_grads = _values_and_grads(folded, x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    _assert_same_gradients(got_grads, want_grads)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-9, atol=1e-12)


def _assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal to float64 rounding, relative to the largest gradient (a conv bias before training-mode BN has an
    exactly-zero gradient in exact arithmetic, so only rounding noise to compare there)."""
    assert got.keys() == want.keys() and len(want) > 10
    scale = max(float(w.abs().max()) for w in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-10 * scale, msg=lambda m, k=k: f"{k}: {m}")


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


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_channels_last_gives_the_same_losses_gradients_and_detections(name):
    cfg = compose(*SHAPES[name], "model.postprocess.score_thresh=0.001")  # an untrained model's scores are low
    size, classes = cfg.data.image_size, len(cfg.data.classes)
    samples = random_samples(2, size, classes, objects=3, min_box=size / 8, max_box=size / 2, seed=0)
    batch = collate_detection(samples, 32)
    results, models = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = instantiate(cfg.model, channels_last=channels_last).net.double()
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
        torch.testing.assert_close(losses[k], plain_losses[k], rtol=1e-6, atol=0)
    _assert_same_gradients(grads, plain_grads)
    assert sum(len(d["scores"]) for d in plain_dets) > 0
    for d, p in zip(dets, plain_dets, strict=True):
        assert torch.equal(d["labels"], p["labels"])
        torch.testing.assert_close(d["scores"], p["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(d["boxes"], p["boxes"], rtol=0, atol=1e-4)


SPARSE_SIZES = [(41, 27), (21, 14), (11, 7), (6, 4), (3, 2)]  # odd sizes: tiles cross every level's edge


def _sparse_head(norm: str = "none") -> RetinaNetHead:
    head = RetinaNetHead(8, num_classes=5, num_anchors=3, norm=norm).double()
    with torch.no_grad():  # σ=0.01 would leave the deeper layers' values near their biases
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


def _features(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 8, h, w, generator=g, dtype=torch.float64).requires_grad_() for h, w in SPARSE_SIZES]


def _box_grads(deltas: torch.Tensor, needed: torch.Tensor, head: RetinaNetHead, features: list[torch.Tensor]):
    weights = torch.linspace(-1, 1, int(needed.sum()) * 4, dtype=torch.float64).view(-1, 4)
    loss = (deltas[needed] * weights).sum()  # reads only the needed anchors, as the box loss does
    params = [p for n, p in head.named_parameters() if n.startswith("box")]
    return torch.autograd.grad(loss, params + features)


def test_sparse_box_deltas_equal_the_dense_ones_where_needed():
    head, features = _sparse_head(), _features()
    n = 3 * sum(h * w for h, w in SPARSE_SIZES)
    g = torch.Generator().manual_seed(1)
    needed = torch.rand(2, n, generator=g) < 0.002
    needed[0, 0] = needed[1, 3 * 41 * 27 - 1] = needed[1, -1] = True  # corners of the first and last levels
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


def test_sparse_box_deltas_run_whole_maps_when_crowded_and_keep_the_graph_when_empty():
    head, features = _sparse_head(), _features()
    n = 3 * sum(h * w for h, w in SPARSE_SIZES)
    everywhere = torch.ones(2, n, dtype=torch.bool)
    assert torch.equal(head.box_deltas_where(features, everywhere), head.box_deltas(features))
    nowhere = torch.zeros(2, n, dtype=torch.bool)
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


def test_sparse_box_training_gives_the_dense_losses_and_gradients(monkeypatch):
    # 320 px: P3 is 40×40, where two small objects' tiles are a fraction of the map
    cfg = compose(*TINY, "model.head.norm=none", "data.image_size=320", "model.priors.size_factor=0.5")
    size, classes = cfg.data.image_size, len(cfg.data.classes)
    batch = collate_detection(random_samples(2, size, classes, 2, 16, 48, seed=0), 32)
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = instantiate(cfg.model).net.double()
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
