"""bench/gpu_check.py off a GPU: the whole check's plumbing at toy sizes on the CPU (`--device cpu --quick`), and
the host-sync counter's attribution of a synchronisation to its site."""

import json
import subprocess
import sys
import warnings

import pytest

from bench import gpu_check

from .preloaded import run_python


@pytest.fixture
def preloaded_children(monkeypatch):
    """The check's own Python children (train.py, pytest) forked from the suite's preloaded interpreter
    (tests/preloaded.py): the same commands, without importing torch and Lightning afresh (~8 s each here)."""
    started = []
    real_run = subprocess.run

    def run(command, *args, cwd=None, env=None, timeout=None, **kwargs):
        if command[0] != sys.executable:
            return real_run(command, *args, cwd=cwd, env=env, timeout=timeout, **kwargs)
        started.append(command[1:])
        return run_python(command[1:], cwd, timeout=timeout or 600, env=env)

    monkeypatch.setattr(subprocess, "run", run)
    return started


def _warn_like_torch(message: str) -> None:
    warnings.warn(message, UserWarning)


def test_a_sync_is_counted_at_the_calling_frame_and_other_warnings_pass_through():
    counter = gpu_check.HostSyncCounter(path="unused.json")
    passed = []
    counter._shown = lambda *args: passed.append(str(args[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = counter.on_warning
        for _ in range(3):
            _warn_like_torch("called a synchronizing CUDA operation")
        _warn_like_torch("something else")
    counter.steps = 3
    (site, function), count = counter.sites.most_common(1)[0]
    assert site.startswith("tests/test_gpu_check.py:") and function == "_warn_like_torch" and count == 3
    assert passed == ["something else"]
    summary = counter.summary()
    assert summary["syncs_per_step"] == 1.0
    assert summary["sites"][0]["named"] is None  # not one the design names
    assert gpu_check.named_sync("detectors/ssd.py:464", "BestMatchIoUAssigner.match_bipartite")
    assert gpu_check.named_sync("detectors/ssd.py:464", "match_bipartite")  # Python 3.10: no qualified names
    assert gpu_check.named_sync("detectors/ssd.py:464", "MultiBoxLoss.__call__") is None  # no longer by design
    assert gpu_check.named_sync("backward", "IndexBackward0") is None  # an autograd node's sync: never by design
    assert "progress bar" in gpu_check.named_sync("lightning", "to_item")


def test_a_missing_requirement_is_named_with_its_pip_line():
    assert gpu_check.missing_modules(["torch", "hydra-core", "no-such-package-xyz"]) == ["no-such-package-xyz"]
    assert "opencv-python-headless" in gpu_check.requirement_names()


def test_cpu_needs_quick_and_cuda_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])
    assert "--quick" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_check_on_cpu_runs_every_section_and_writes_the_report(tmp_path, preloaded_children):
    """Every section runs (the CUDA tests all skip here), the report holds each model's rows, and goals that need a
    GPU are marked not applicable rather than failed."""
    status = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert status == 0
    assert [c[:2] for c in preloaded_children] == [
        ["-m", "pytest"],
        *[["train.py", "experiment=" + m + "_shapes"] for m in ("retinanet", "ssd", "yolo")],
    ]
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    loader_status = "ok" if gpu_check.VOC_SAMPLE.is_dir() else "skipped"  # the VOC sample of ../shared/data
    assert {k: v["status"] for k, v in sections.items()} == {**dict.fromkeys(sections, "ok"), "loader": loader_status}
    tests = sections["tests"]["results"]
    assert tests["failures"] == tests["errors"] == tests["passed"] == 0  # no GPU: every CUDA case skipped
    rows = {r["model"]: r for r in sections["bench"]["results"]["rows"]}
    assert set(rows) == {"retinanet", "ssd", "yolo"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert rows["ssd"]["speedup"] > 0 and rows["yolo"]["peer"] is None
    for model, run in sections["train"]["results"].items():
        # 4 steps of 4 images, the first left out; no CUDA, so nothing to count
        assert (run["steps"], run["images"], run["device"]) == (3, 12, "cpu"), model
        assert run["syncs_per_step"] == 0 and run["images_per_s"] > 0
        # the step's split (StepProfiler): the same 3 steps, every part measured, the parts within the wall time
        split = run["split"]
        assert split["steps"] == 3 and all(split[f"{k}_s"] > 0 for k in ("data", "forward", "backward", "optimizer"))
        parts = sum(split[f"{k}_s"] for k in ("data", "forward", "backward", "optimizer"))
        assert parts <= split["wall_s"] and split["rest_s"] == pytest.approx(split["wall_s"] - parts, abs=1e-9)
    if loader_status == "ok":
        assert list(sections["loader"]["results"]["sets"]) == ["VOC"]  # --quick: the VOC sample alone
        loader = sections["loader"]["results"]["sets"]["VOC"]["models"]
        assert set(loader) == {"retinanet", "ssd", "yolo"}
        assert all(m["recommended_workers"] in (0, 1) for m in loader.values())
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert [met for goal, met in goals.items() if "minutes" not in goal] and all(
        met is None for goal, met in goals.items() if "minutes" not in goal
    )
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Goals", "## CUDA tests", "## A training step", "## train.py", "Where a train.py step's time"):
        assert heading in text
    assert ("## The training loader on VOC" in text) == (loader_status == "ok")


def made_up_run(rate: float, **extra) -> dict:
    """A train.py run's figures as run_training returns them (made up: the report's tests read, not measure)."""
    return {
        "device": "cuda",
        "steps": 100,
        "images": 3200,
        "images_per_s": rate,
        "wait_share": 0.05,
        "gpu_utilisation": 0.95,
        "syncs_per_step": 2.0,
        "sync_s": 0.001,
        "unnamed_syncs": [],
        "sites": [],
        "split": {},
        "command": "python train.py model=ssd",
        "wall_s": 60.0,
        **extra,
    }


def test_one_detector_failing_to_train_keeps_the_others_figures(tmp_path, monkeypatch):
    """The train section goes on past a detector whose train.py fails (on its first GPU, RetinaNet's bf16 run
    diverged and hid SSD's and YOLO's runs): the section is failed, naming that detector, with the others' rows.
    The others' runs are made up (the quick check above trains all three for real)."""

    def run_training(model, *args):
        if model == "retinanet":
            raise RuntimeError("train.py retinanet exited 1: non-finite loss")
        return made_up_run(100.0)

    monkeypatch.setattr(gpu_check, "run_training", run_training)
    status = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--skip", "tests,bench,loader"])
    assert status == 1
    train = json.loads((tmp_path / "report.json").read_text())["sections"]["train"]
    assert train["status"] == "failed" and set(train["results"]) == {"ssd", "yolo"}
    assert train["error"].startswith("retinanet: RuntimeError: train.py retinanet exited 1")
    text = (tmp_path / "report.md").read_text()
    assert "**train failed:**" in text and "| ssd |" in text and "| yolo |" in text


def test_the_step_split_leaves_out_the_warm_up_and_a_validation_between_steps(tmp_path, monkeypatch):
    """StepProfiler on a scripted sequence of Lightning's actions, on a fake clock: 1 warm-up step, then 3 steps of
    10 s (data 1, forward 2, backward 3, optimiser's own 1, rest 3), a 50 s validation (its own transfers and
    steps) after the second."""
    clock = [0.0]
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])
    profiler = gpu_check.StepProfiler(path=str(tmp_path / "split.json"), skip_steps=1)

    def action(name: str, seconds: float, inside=()) -> None:
        profiler.start(name)
        for inner in inside:
            inner()
        clock[0] += seconds
        profiler.stop(name)

    def step() -> None:
        action("[_TrainingEpochLoop].train_dataloader_next", 0.6)
        action("[Strategy]SingleDeviceStrategy.batch_to_device", 0.4)
        training = (
            lambda: action("[Strategy]SingleDeviceStrategy.training_step", 2),
            lambda: action("[Strategy]SingleDeviceStrategy.backward", 3),
        )
        optimiser = lambda: action("[LightningModule]DetectionModule.optimizer_step", 1, training)  # noqa: E731
        action("run_training_batch", 0, (optimiser,))
        clock[0] += 3  # callbacks, logging

    def validation() -> None:
        action("[LightningModule]DetectionModule.on_validation_start", 1)
        action("[Strategy]SingleDeviceStrategy.batch_to_device", 4)
        action("[Strategy]SingleDeviceStrategy.validation_step", 45)

    for run in (step, step, step, validation, step):
        run()
    split = profiler.split()
    assert split["steps"] == 3
    assert split["wall_s"] == pytest.approx((4 * 10 - 3 - 10) / 3)  # first counted fetch to last step's end
    assert (split["data_s"], split["forward_s"], split["backward_s"], split["optimizer_s"]) == pytest.approx(
        (1, 2, 3, 1)
    )


def test_the_report_sets_compile_against_eager_and_train_py_against_the_step(tmp_path):
    """A GPU run's train section as the report reads it (figures made up): compile=true's rate over eager's with
    its recompiles, and train.py's rate over the step bench's, each against issue 31's goal."""

    sections = {n: gpu_check.Section(n, status="ok") for n in ("environment", "tests", "bench", "train", "loader")}
    sections["environment"].results = {"gpu": "NVIDIA H100"}
    bench_row = {"model": "ssd", "what": "SSD300", "images_per_s": 1000.0, "speedup": 2.5, "peak_gib": 2.8}
    sections["bench"].results = {"rows": [bench_row]}
    compiled = made_up_run(1100.0, compiled_graphs=7, recompiles=1, wall_s=150.0)
    sections["train"].results = {"ssd": made_up_run(850.0, compiled=compiled)}
    goals = {g["goal"]: (g["value"], g["met"]) for g in gpu_check.goals(sections, 300.0)}
    assert goals["ssd: train.py's training images/s ≥ 90% of the step bench's"] == ("85%", False)
    assert goals["ssd: the GPU busy ≥ 90% of train.py's steps (nvidia-smi)"] == ("95%", True)
    compile_goal = "ssd: compile=true trains faster than eager (else off, with this reason)"
    assert goals[compile_goal] == ("1.29×, 1 recompiles", True)
    assert goals["SSD300: training images/s ≥ 2.0× torchvision's"] == ("2.50×", True)
    text = gpu_check.markdown(sections, 300.0, [])
    assert "| ssd | 850.0 | 1100.0 | 1.29× | 7 | 1 | 60 | 150 |" in text


def test_dynamo_counters_are_read_as_counts():
    from torch._dynamo.utils import counters

    counters["recompiles"]["test_gpu_check"] += 2
    try:
        assert gpu_check._dynamo_count("recompiles") >= 2
        assert gpu_check._dynamo_count("no-such-group", "x") == 0
    finally:
        del counters["recompiles"]["test_gpu_check"]
