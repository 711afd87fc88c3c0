"""Multi-process runs: DDP under Hydra writes one run folder, evaluates each image once, and refuses the traps."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from engine.distributed import config_differences, flatten
from engine.preflight import resolve_ckpt_path, scale_learning_rate

from ..conftest import ROOT, TINY, compose
from ..preloaded import run_python

DDP_RUN = (
    *TINY,
    "trainer=ddp_sim",
    "trainer.max_epochs=1",
    "data.num_train=32",
    "data.num_val=19",
    "data.val_batch_size=5",
    "model.scheduler.warmup_steps=0",
)  # batches of ≥ 2: GroupNorm on the 1×1 P7


def run(tmp_path, *overrides, check=True):
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's argparse wants -m before the overrides
    done = run_python(
        [ROOT / "train.py", *flags, f"paths.log_dir={tmp_path}", *(o for o in overrides if not o.startswith("-"))],
        tmp_path,
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_ddp_on_two_processes_writes_one_run_and_evaluates_like_one_process(tmp_path):
    done = run(tmp_path, *DDP_RUN)
    runs = list((tmp_path / "retinanet_shapes").iterdir())
    assert len(runs) == 1, runs  # rank 1 writes into rank 0's folder
    folder = runs[0]
    assert done.stdout.count("run folder:") == 1 and len(list(tmp_path.rglob("metrics.json"))) == 1
    assert len(list(tmp_path.rglob("config.yaml"))) == 1
    assert (folder / "train.log").is_file() and not list(tmp_path.glob("*.log"))  # logs in the run folder
    metrics = json.loads((folder / "metrics.json").read_text())

    # the best checkpoint validated by one process on the same 19 images (uneven: 10 and 9 per rank above)
    cfg = compose(*DDP_RUN[:-4], "data.num_train=32", "data.num_val=19", "data.val_batch_size=5")
    ckpt = torch.load(folder / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    model = instantiate(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(model, datamodule=instantiate(cfg.data), verbose=False)[0]
    for key in ("val/map", "val/map_50", "val/voc07_map_50", "val/voc_map_50", "val/mar_100"):
        assert metrics[key] == pytest.approx(single[key], abs=1e-6), key


@pytest.mark.slow
def test_ranks_with_different_configs_are_stopped(tmp_path):
    # Lightning gives each child its LOCAL_RANK: a config reading it differs between the ranks
    done = run(tmp_path, *DDP_RUN, "+probe=${oc.env:LOCAL_RANK,unset}", check=False)
    assert done.returncode != 0
    assert "composed different configs" in done.stderr + done.stdout and "probe" in done.stderr + done.stdout


@pytest.mark.slow
def test_multirun_with_ddp_is_refused_before_any_process_starts(tmp_path):
    done = run(tmp_path, "-m", *DDP_RUN, "seed=1,2", check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "ddp_spawn" in out and "hydra/launcher=slurm" in out
    assert not list(tmp_path.rglob("*.ckpt"))


def test_validation_loader_splits_images_between_ranks_without_repeats():
    data = instantiate(compose(*TINY, "data.num_val=19", "data.val_batch_size=4").data)
    seen = []
    for rank in range(2):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = data.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)  # Lightning keeps a DistributedSampler
        seen += list(loader.sampler)
    assert sorted(seen) == list(range(19))
    data.trainer = None
    assert not isinstance(data.val_dataloader().sampler, UnrepeatedDistributedSampler)


def test_config_differences_name_the_keys():
    a = flatten({"model": {"loss": {"gamma": 2.0}, "sizes": [1, 2]}, "seed": 1})
    assert a == {"model.loss.gamma": 2.0, "model.sizes.0": 1, "model.sizes.1": 2, "seed": 1}
    b = flatten({"model": {"loss": {"gamma": 0.5}, "sizes": [1, 2, 3]}, "seed": 1})
    assert config_differences(a, b) == ["model.loss.gamma", "model.sizes.2"]
    assert config_differences(a, a) == []


def test_learning_rate_scales_with_the_total_batch():
    cfg = compose(*TINY, "lr_scaling.enabled=true", "lr_scaling.base_batch_size=16", "data.batch_size=8")
    base_lr = cfg.model.optimizer.lr
    scale_learning_rate(cfg, SimpleNamespace(world_size=4, accumulate_grad_batches=2))
    assert cfg.model.optimizer.lr == pytest.approx(base_lr * 8 * 4 * 2 / 16)
    assert instantiate(cfg.model).optimizer_factory.keywords["lr"] == pytest.approx(base_lr * 4)

    off = compose(*TINY, "lr_scaling.base_batch_size=16")
    scale_learning_rate(off, SimpleNamespace(world_size=4, accumulate_grad_batches=1))
    assert off.model.optimizer.lr == base_lr
    with pytest.raises(ValueError, match="lr_scaling.base_batch_size"):
        scale_learning_rate(
            compose(*TINY, "lr_scaling.enabled=true"), SimpleNamespace(world_size=2, accumulate_grad_batches=1)
        )


def test_last_prefers_this_run_folders_checkpoint(tmp_path):
    own, newer = tmp_path / "t" / "job-1", tmp_path / "t" / "job-2"
    for folder in (own, newer):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", str(tmp_path), "t", str(own)) == str(own / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", str(tmp_path), "t", str(tmp_path / "t" / "fresh")) == str(
        newer / "checkpoints" / "last.ckpt"
    )


def test_slurm_launcher_gives_one_task_per_device():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout > 0 and launcher.cpus_per_task == cfg.data.num_workers


def test_run_folder_is_keyed_by_the_slurm_job(monkeypatch):
    from engine.config import run_id

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert run_id() == "slurm-4242"  # a requeued job (same id) finds its folder and its checkpoints again
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert run_id() == "slurm-4242.3"
    monkeypatch.delenv("SLURM_STEP_ID")  # an salloc shell, outside any step: a time-stamped folder
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", run_id())


def test_auto_resumes_only_from_this_run_folder(tmp_path):
    own = tmp_path / "t" / "slurm-1"
    (own / "checkpoints").mkdir(parents=True)
    assert resolve_ckpt_path("auto", str(tmp_path), "t", str(own)) is None  # first start: fresh
    (own / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", str(tmp_path), "t", str(own)) == str(own / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("auto", str(tmp_path), "t", str(tmp_path / "t" / "slurm-2")) is None


def test_ranks_started_by_srun_write_one_config_and_their_own_logs(monkeypatch):
    from omegaconf import OmegaConf

    names = OmegaConf.create({"subdir": "${rank_zero:.hydra}", "log": "train${rank_suffix:}.log"})
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert (names.subdir, names.log) == (".hydra", "train.log")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert (names.subdir, names.log) == (None, "train_rank3.log")
