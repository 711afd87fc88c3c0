"""Every command README.md prints, run here in a shortened form or, where it cannot run here, checked as far as it
can be without running, so that a README edit that breaks a command fails the suite (issue 18).

How (details in tests/readme_commands.py):
- Extraction: markdown-it-py parses README.md; each ```bash line (continuations joined, `#` comments dropped,
  `&&` parts apart, a `#!` script's directives kept for its check) and each ```python block is one command.
  pytest-examples, mktestdocs and phmdoctest run blocks as written (python, or a bash block as a whole script) with
  no way to shorten a command first, which is what this test needs, so none of them fits.
- Running: the runnable commands go, in README order, to two runner interpreters, one a core (train.py & co.
  through runpy, so torch and Lightning are imported once in each), started as soon as the first test asks for
  them, while the checks-without-running go on here. The second runner, in its own folder, takes the commands
  that read a data set from disk (`data.root=`: they depend on no other README command but each other) and
  the commands without placeholders that are not training; the first takes the rest, in README order, with
  the reference run first. Training commands run once per *kind* (network, data module, training
  transform, multirun/sweeper, resume, fine-tune, fast_dev_run: readme_commands.kind_of); a later command of a
  kind that ran is composed with its shortening and its model and data module are built, without training.
- Shortening (readme_commands.SHORTEN, by what the composed config holds, never per README line): one epoch of
  one training and one validation batch of 2 images, 4/2 shapes images, no pictures, no re-validation, no loader
  processes; RetinaNet at 64 px (longer side ≤ 107) instead of 800; ResNet-18 for deeper ResNets, an eighth of
  VGG16's / YOLO's channels and YOLO's FC layer 256 wide; no ImageNet weights (a download); one CPU process for
  multi-GPU/DDP lines; a multirun's first 2 jobs (its full job count is checked against the README's comment);
  1 Optuna trial; no memory probe; predict.py without reader processes; export.py's ONNX through the legacy
  exporter (torch.export's costs ~10 s more; tests/test_tools.py round-trips it). The command's own overrides
  are kept. Data roots → ../shared/data's real VOC2012 / COCO2017 samples (skip when absent; VOC's 2012 splits
  where the command's sets are VOC2007's), or a COCO-format set made from the COCO sample with the command's
  split names and classes.
- Placeholders: `<run>`, `<date>_<time>` → the newest existing match (a tiny `experiment=yolo_shapes` run trained
  first, the README's earlier commands' folders); `...` → that reference run (`experiment=...`, `ckpt_path=...`,
  `runs/.../best.ckpt`), or with `data=X` the newest checkpoint an earlier README command trained on X.
- Every command is either run or listed in NOT_RUN with its reason and check; any other fails
  test_every_command_is_run_or_listed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .readme_commands import Command, expand_sweep, make_recipe, readme_commands, sweep_values

COMMANDS = readme_commands()
RUNNER_TIMEOUT = 240  # s; each runner's commands take ~30 s on the 2-core reference machine


def train_args(cmd: Command) -> list[str]:
    """The overrides after `train.py` (also inside `srun python train.py ...`)."""
    i = cmd.argv.index("train.py")
    return cmd.argv[i + 1 :]


def with_reference(args: list[str]) -> list[str]:
    return ["experiment=yolo_shapes" if a == "..." else a for a in args]


def compose(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=overrides, return_hydra_config=True)


# --- what cannot run here, and how each is checked instead --------------------------------------------------
def check_make_test(cmd: Command) -> None:
    assert "pytest" in make_recipe("test")[1:3], make_recipe("test")


def check_pip_install(cmd: Command) -> None:
    """Installs the project (an editable install of this folder) with extras pyproject.toml defines."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    path, _, extras = cmd.argv[cmd.argv.index("-e") + 1].partition("[")
    assert path == "." and set(filter(None, extras.rstrip("]").split(","))) <= set(project["optional-dependencies"])


def check_own_data(cmd: Command) -> None:
    """The command composes (every key exists, the recipe and data group resolve) and leaves the classes to the
    data; the same layouts train end to end in tests/datamodules (generated exports and the real BCCD folder).
    eval.py on such a run: its data composes the same way (the classes come from the checkpoint)."""
    if "eval.py" in cmd.argv:
        cfg = compose("eval", cmd.argv[cmd.argv.index("eval.py") + 1 :])
        assert cfg.data.classes is None and cfg.data._target_.endswith("VOCDataModule") and cfg.ckpt_path
        return
    cfg = compose("train", train_args(cmd))
    assert cfg.data.classes is None and (cfg.task_name.endswith("_cpu") or cfg.model.finetune_from == "torchvision")
    assert cfg.data._target_.endswith(("VOCDataModule", "COCODataModule"))


def check_srun(cmd: Command) -> None:
    """The script's #SBATCH geometry is what its train.py command asks Lightning for."""
    sbatch = dict(re.findall(r"--([\w-]+)=(\S+)", " ".join(cmd.script)))
    cfg = compose("train", train_args(cmd))
    assert int(sbatch["nodes"]) == cfg.trainer.num_nodes
    assert int(sbatch["ntasks-per-node"]) == int(sbatch["gpus-per-node"]) == cfg.trainer.devices
    assert cfg.ckpt_path == "auto" and "--requeue" in " ".join(cmd.script)


def check_slurm_launcher(cmd: Command) -> None:
    """Each job of the sweep composes, and submitit gets one task per GPU on the command's nodes."""
    args = [a for a in train_args(cmd) if a != "-m"]
    jobs = expand_sweep(args)
    assert len(jobs) == math.prod(len(sweep_values(a) or [a]) for a in args)
    for job in jobs:
        cfg = compose("train", job)
        launcher = cfg.hydra.launcher
        assert "submitit" in launcher._target_ and launcher.partition == "gpu"
        assert (launcher.nodes, launcher.tasks_per_node) == (cfg.trainer.num_nodes, cfg.trainer.devices)


def check_wandb(cmd: Command) -> None:
    if cmd.argv[1] == "agent":  # its argument is the id the `wandb sweep` before it on the line prints
        before = [c for c in COMMANDS if c.line == cmd.line and c.argv[:2] == ["wandb", "sweep"]]
        assert before and re.fullmatch(r"<[^>]+>", cmd.argv[2]), cmd.text
        return
    sweep = yaml.safe_load((ROOT / cmd.argv[2]).read_text())
    assert (ROOT / sweep["program"]).is_file()
    runs = math.prod(len(p["values"]) for p in sweep["parameters"].values() if "values" in p)
    stated = re.search(r"(\d+) runs", cmd.comment)
    assert stated is None or int(stated.group(1)) == runs, (cmd.comment, runs)


def check_download(cmd: Command) -> None:
    from hydra.utils import instantiate

    data = instantiate(compose("train", train_args(cmd)).data)
    assert data.download is True


def check_compile(cmd: Command) -> None:
    cfg = compose("train", with_reference(train_args(cmd)))
    assert cfg.compile is True and cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 35


NOT_RUN = [  # (what the command contains, why it is not run, its check)
    ("make test", "runs the whole suite, this file included", check_make_test),
    ("pip install", "installs into an environment: the suite runs in the one `make setup` built", check_pip_install),
    ("data.classes=null", "trains on the user's own export, at a path only they have", check_own_data),
    ("srun ", "SLURM's srun and a cluster are not here", check_srun),
    ("hydra/launcher=slurm", "submits SLURM jobs: no cluster here", check_slurm_launcher),
    ("wandb ", "creates / runs a sweep on the W&B server: no login or network here", check_wandb),
    ("data.download=true", "downloads the VOC archives: no network here", check_download),
    ("compile=true", "torch.compile's first steps take minutes on a CPU", check_compile),
]


def not_run_rule(cmd: Command):
    return next((rule for rule in NOT_RUN if rule[0] in cmd.text + " "), None)


# --- what runs ----------------------------------------------------------------------------------------------
def run_spec(cmd: Command) -> dict | None:
    """The runner's entry for a command it can run, None for one it cannot."""
    spec = {"id": cmd.id, "env": cmd.env}
    if cmd.lang == "python":
        # the loaded weights equal torchvision's, mapped: what the block is for
        check = (
            "[sum(__import__('torch').equal(module.net.state_dict()[k], v) for k, v in "
            "torchvision_retinanet_state_dict(tv.state_dict()).items()), len(module.net.state_dict())]"
        )
        return {**spec, "kind": "python-block", "args": [], "code": cmd.text, "check": check}
    argv = cmd.argv
    if argv[0] == "make":
        argv = ["python", *make_recipe(argv[1])[1:]]
    if argv[0] not in ("python", "python3") or len(argv) < 2:
        return None
    module = ROOT / argv[2].replace(".", "/") if argv[1] == "-m" and len(argv) > 2 else None
    if module and (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
        return {**spec, "kind": argv[2], "program": f"-m {argv[2]}", "args": argv[3:]}
    if argv[1].endswith(".py") and (ROOT / argv[1]).is_file():
        return {**spec, "kind": Path(argv[1]).name, "program": argv[1], "args": argv[2:]}
    return None


RUN = [(c, s) for c in COMMANDS if not_run_rule(c) is None and (s := run_spec(c)) is not None]
CHECKED = [c for c in COMMANDS if not_run_rule(c) is not None]
REFERENCE = {"id": "reference run", "kind": "train.py", "program": "train.py", "args": ["experiment=yolo_shapes"]}


class Runner:
    def __init__(self, workdir: Path, specs: list[dict]):
        self.workdir, self.results_path = workdir, workdir / "results.json"
        plan = {"workdir": str(workdir), "commands": specs}
        (workdir / "plan.json").write_text(json.dumps(plan))
        self.log = open(workdir / "runner.log", "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "readme_commands.py"),
                str(workdir / "plan.json"),
                str(self.results_path),
            ],
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        )
        self.started = time.monotonic()

    def result(self, command_id: str) -> dict:
        """The command's result, once the runner has it (or has stopped)."""
        while True:
            done = self.process.poll() is not None
            results = json.loads(self.results_path.read_text()) if self.results_path.exists() else []
            found = next((r for r in results if r["id"] == command_id), None)
            if found or done:
                break
            if time.monotonic() - self.started > RUNNER_TIMEOUT:
                self.process.kill()
                pytest.fail(f"the runner took over {RUNNER_TIMEOUT} s")
            time.sleep(0.2)
        assert found, f"the runner stopped before {command_id}: {(self.workdir / 'runner.log').read_text()[-3000:]}"
        return found

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def second_runner(spec: dict) -> bool:
    """A data set on disk, or no placeholder and no training: depends on no other README command but these."""
    args = spec["args"]
    if any(a.startswith("data.root=") for a in args):
        return True
    independent = not any("<" in a or "..." in a or a.startswith("ckpt_path=") for a in args)
    return independent and ("--help" in args or spec["kind"] not in ("train.py", "summarize.py"))


@pytest.fixture(scope="module")
def runners(tmp_path_factory) -> dict[str, Runner]:
    """Command id → the runner that runs it."""
    specs = [s for _, s in RUN]
    first = Runner(tmp_path_factory.mktemp("readme"), [REFERENCE, *(s for s in specs if not second_runner(s))])
    second = Runner(tmp_path_factory.mktemp("readme"), [s for s in specs if second_runner(s)])
    yield {s["id"]: second if second_runner(s) else first for s in specs}
    first.close()
    second.close()


# --- tests --------------------------------------------------------------------------------------------------
def test_every_command_is_run_or_listed(runners):
    """Starts the runner (so it works while the checks below go on), and fails on a README command that this
    test neither runs nor lists in NOT_RUN, or a NOT_RUN entry that no longer matches a command."""
    assert len(COMMANDS) >= 30 and any(c.lang == "python" for c in COMMANDS)
    unaccounted = [c.id for c in COMMANDS if not_run_rule(c) is None and run_spec(c) is None]
    assert not unaccounted, f"README commands neither run nor listed in NOT_RUN: {unaccounted}"
    stale = [rule[0] for rule in NOT_RUN if not any(not_run_rule(c) == rule for c in COMMANDS)]
    assert not stale, f"NOT_RUN entries matching no README command: {stale}"


@pytest.mark.parametrize("cmd", CHECKED, ids=[f"{c.id} (not run: {not_run_rule(c)[1]})" for c in CHECKED])
def test_checked_without_running(cmd):
    _, _reason, check = not_run_rule(cmd)
    check(cmd)


COUNTED = [
    c for c in COMMANDS if "-m" in c.argv and "train.py" in c.argv and re.search(r"\d+ (jobs|trials)", c.comment)
]


@pytest.mark.parametrize("cmd", COUNTED, ids=[c.id for c in COUNTED])
def test_multirun_job_count_is_the_readme_comment(cmd):
    """A sweep's job count as Hydra expands it (an Optuna search: its trials) is the count the comment states."""
    args = [a for a in train_args(cmd) if a != "-m"]
    stated = re.search(r"(\d+) (jobs|trials)", cmd.comment)
    if stated.group(2) == "trials":
        assert compose("train", args).hydra.sweeper.n_trials == int(stated.group(1))
    else:
        assert len(expand_sweep(args)) == int(stated.group(1))


def new_files(result: dict, pattern: str) -> list[str]:
    return [f for f in result["new_files"] if re.fullmatch(pattern, f)]


@pytest.mark.slow
@pytest.mark.parametrize(("cmd", "spec"), RUN, ids=[c.id for c, _ in RUN])
def test_runs_shortened(cmd, spec, runners):
    runner = runners[spec["id"]]
    result = runner.result(spec["id"])
    if result.get("skip"):
        pytest.skip(result["skip"])
    assert result["rc"] == 0, f"{result.get('args')}\n{result['output']}"
    args, out = result["args"], result["output"]
    if result.get("same_kind_as"):  # composed and built; the command of its kind that ran is tested on its own
        assert result["built"] and runner.result(result["same_kind_as"])["rc"] == 0
        return
    kind = spec["kind"]
    if kind == "train.py" and "--help" in args:
        assert "experiment:" in out and "model:" in out  # the config groups
    elif kind == "train.py" and any(a.startswith("debug=fast_dev_run") for a in args):
        assert not new_files(result, r".*\.ckpt"), "fast_dev_run writes no checkpoints"
    elif kind == "train.py" and "-m" in args:
        jobs = new_files(result, r"runs/[^/]+/multirun/[^/]+/\d+/metrics\.json")
        trials = [a for a in args if a.startswith("hydra.sweeper.n_trials=")]
        expected = int(trials[0].split("=")[1]) if trials else len(expand_sweep([a for a in args if a != "-m"]))
        assert len(jobs) == expected, result["new_files"]
        if trials:
            assert new_files(result, r"runs/[^/]+/multirun/[^/]+/optimization_results\.yaml")
    elif kind == "train.py":
        (metrics,) = new_files(result, r"runs/[^/]+/[^/]+/metrics\.json")
        run = metrics.rsplit("/", 1)[0]
        assert {f"{run}/checkpoints/best.ckpt", f"{run}/checkpoints/last.ckpt"} <= set(result["new_files"])
        assert "val/map" in json.loads((runner.workdir / metrics).read_text())
        if "ckpt_path=last" in args:
            assert "resuming from" in out
    elif kind == "eval.py":
        (metrics,) = new_files(result, r"runs/eval/[^/]+/metrics\.json")
        assert metrics.replace("metrics.json", "coco_results.json") in result["new_files"]
    elif kind == "predict.py":  # one picture per input image, and detections.json
        values = dict(a.split("=", 1) for a in args if "=" in a)
        output, photos = values["output"].rstrip("/"), [f for f in result["new_files"] if f.startswith(values["input"])]
        assert f"{output}/detections.json" in result["new_files"]
        assert len(new_files(result, rf"{output}/[^/]+\.jpg")) == len(photos) > 0
    elif kind == "export.py":
        fmt = next(a for a in args if a.startswith("format=")).split("=")[1]
        assert new_files(result, r"runs/export/[^/]+/model\." + ("onnx" if fmt == "onnx" else r"torchscript\.pt"))
    elif kind == "datamodules.browse":
        out_file = next(a for a in args if a.startswith("out=")).split("=")[1]
        assert out_file in result["new_files"]
    elif kind == "summarize.py":
        assert len(new_files(result, r".*/summary\.(md|csv)")) == 2
    elif kind == "python-block":
        equal, total = result["check"]
        assert equal == total > 300, result["check"]  # every weight of the model is torchvision's
    else:
        pytest.fail(f"no expectation for {kind}: add one")
