"""The contracts between the parts (detectors/protocols.py), held by every paper's parts."""

import pytest
import torch
from hydra.utils import instantiate

from detectors.batch import collate_detection

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
