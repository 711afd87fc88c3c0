"""Each package imports on its own, in a fresh interpreter, whatever is imported first; the models' parts load no
Lightning (the suite's own imports hide both: conftest imports everything before any test runs)."""

import subprocess
import sys

import pytest

from .conftest import ROOT


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_metrics_import_first_without_a_cycle():
    # evaluation.detection_metrics (with coco, voc) reads detectors' boxes, the training module reads the metrics
    # and the detectors
    done = fresh_python("import evaluation.detection_metrics")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_the_network_and_its_parts_load_no_lightning():
    done = fresh_python(
        "import sys, detectors.retinanet, detectors.ssd, detectors.yolo, detectors.boxes\n"
        "from detectors import DenseDetector\n"
        "assert not any(m.startswith('lightning') for m in sys.modules), 'lightning imported'\n"
        "from engine.detection_module import DetectionModule\n"
        "import lightning\n"
        "assert issubclass(DetectionModule, lightning.LightningModule)"
    )
    assert done.returncode == 0, done.stderr[-2000:]
