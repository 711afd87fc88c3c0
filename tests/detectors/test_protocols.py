"""The contracts between the parts (detectors/protocols.py), held by every paper's parts."""

import inspect

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from detectors import protocols
from detectors.batch import collate_detection
from detectors.priors import PriorGenerator

from ..conftest import TINY, compose

PAPERS = {
    "retinanet": (*TINY, "model.head.norm=none"),  # the paper's head, whose box branch can run apart
    "ssd": ("experiment=ssd_shapes", "data.image_size=64", "model.backbone.width=0.125"),
    "yolo": ("experiment=yolo_shapes", "data.image_size=64", "model.head.hidden=32", "model.head.dropout=0"),
}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_box_deltas_used_marks_exactly_the_deltas_the_loss_reads(name):
    """``Loss.box_deltas_used`` is what the sparse box path computes and nothing else: the loss's gradient with
    respect to the box deltas is non-zero at those priors and zero everywhere else."""
    cfg = compose(*PAPERS[name])
    net, data = instantiate(cfg.model).net, instantiate(cfg.data)
    batch = collate_detection([data.train_set[i] for i in range(4)])
    features, priors = net.features(batch.images)
    outputs = {k: v.detach().requires_grad_() for k, v in net.head(features).items()}
    assert set(outputs) <= {"class_scores", "box_deltas", "objectness"}  # one set of names for the three papers
    with torch.no_grad():
        assigned = net.assigner(priors, batch, net.num_classes, outputs)
    sum(net.loss(outputs, assigned, priors).values()).backward()
    read = outputs["box_deltas"].grad.abs().sum(-1) > 0
    used = net.loss.box_deltas_used(assigned, net.num_classes)
    assert used.any() and torch.equal(read, used)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_every_part_declares_what_chooses_the_training_path(name):
    net = instantiate(compose(*PAPERS[name]).model).net
    sparse = {"retinanet": True, "ssd": False, "yolo": False}[name]
    assert net.head.sparse_box_training is sparse and net.sparse_box_training is sparse
    assert net.assigner.uses_predictions is (name == "yolo")  # the responsible predictor is the best-overlapping one


def protocol_members(protocol: type) -> tuple[dict[str, inspect.Signature], set[str]]:
    """A Protocol's methods (their signatures, ``self`` left out) and attributes, its bases' included."""
    methods, attributes = {}, set()
    for cls in reversed([c for c in protocol.__mro__ if c.__module__ == protocols.__name__]):
        attributes |= set(cls.__dict__.get("__annotations__", {}))
        for name, value in vars(cls).items():
            if isinstance(value, property):
                attributes.add(name)
            elif callable(value) and (name == "__call__" or not name.startswith("_")):
                methods[name] = inspect.signature(value)
    return {k: v.replace(parameters=list(v.parameters.values())[1:]) for k, v in methods.items()}, attributes


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_every_part_keeps_its_protocol(name):
    """Each paper's built parts take what their Protocol's methods take (names, order, defaults) and have its
    attributes: what ``DenseDetector`` and ``DetectionModule`` are typed with holds for the parts the configs build."""
    net = instantiate(compose(*PAPERS[name]).model).net
    sparse_head = protocols.SparseBoxHead if net.head.sparse_box_training else protocols.Head
    parts = {
        "backbone": protocols.Backbone,
        "head": sparse_head,
        "assigner": protocols.Assigner,
        "loss": protocols.Loss,
        "postprocess": protocols.Postprocess,
    }
    for part, protocol in parts.items():
        obj = getattr(net, part)
        methods, attributes = protocol_members(protocol)
        assert all(hasattr(obj, a) for a in attributes), (part, attributes)
        for method, signature in methods.items():
            own = getattr(obj, "forward" if method == "__call__" and isinstance(obj, nn.Module) else method)
            theirs = [(p.name, p.kind, p.default) for p in inspect.signature(own).parameters.values()]
            assert theirs == [(p.name, p.kind, p.default) for p in signature.parameters.values()], (part, method)
    assert isinstance(net.priors, PriorGenerator)  # the priors' contract is that base class
