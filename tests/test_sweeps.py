"""The sweep files (sweeps/*.yaml for W&B, conf/hparams_search/ for Optuna) and sweeps/summarize.py, without
training: each W&B sweep against W&B's sweep schema, its grid expanded, every run's command line built as the
W&B agent builds it and composed through Hydra against the real config; the equivalent Hydra multiruns
expanded by Hydra's basic sweeper; the summary of a fabricated multirun folder."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import re
import shlex
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose as hydra_compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"

# RetinaNet (Lin et al. 2017) Table 1a: α-balanced cross entropy (γ = 0) at these α; Table 1b: each γ with the α
# that did best for it (§5.1: "we find the best α for each γ"), as the paper's Table 1 prints them
TABLE_1A_ALPHAS = [0.10, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999]
TABLE_1B_GAMMA_ALPHA = [(0, 0.75), (0.1, 0.75), (0.2, 0.75), (0.5, 0.5), (1, 0.25), (2, 0.25), (5, 0.25)]
TABLE_1B_GAMMAS = [gamma for gamma, _ in TABLE_1B_GAMMA_ALPHA]
# each sweep file's parameters → their values as Hydra reads them back, in the file's order
PAPER_GRIDS = {
    # Table 1b's γ crossed with four of Table 1a's α: a grid, not a table of the paper
    "focal_loss.yaml": {"model.loss.gamma": TABLE_1B_GAMMAS, "model.loss.alpha": [0.25, 0.5, 0.75, 0.999]},
    "focal_loss_table1a.yaml": {"model.loss.gamma": [0], "model.loss.alpha": TABLE_1A_ALPHAS},
    "focal_loss_table1b.yaml": {"model.loss": [{"gamma": g, "alpha": a} for g, a in TABLE_1B_GAMMA_ALPHA]},
    "ssd_layers.yaml": {"model.num_prediction_layers": [1, 2, 3, 4, 5, 6]},  # SSD (Liu et al. 2016) Table 3
}
TABLE_1 = {
    "focal_loss_table1a.yaml": [(0, alpha) for alpha in TABLE_1A_ALPHAS],
    "focal_loss_table1b.yaml": TABLE_1B_GAMMA_ALPHA,
}
AGENT_PREFIX = ["/usr/bin/env", "python", "train.py"]  # what ${env} ${interpreter} ${program} become on Linux


def load_sweep(name: str) -> dict:
    return yaml.safe_load((SWEEPS / name).read_text())


def wandb_sweep_engine():
    """W&B's own sweep engine (the `sweeps` package, wandb[sweeps]): its JSON schema and grid search. Our
    sweeps/ folder is no package, so a plain `import sweeps` finds W&B's when it is installed."""
    try:
        with warnings.catch_warnings():  # its pydantic-v1 style config warns under pydantic 2
            warnings.simplefilter("ignore")
            from sweeps import schema_violations_from_proposed_config  # noqa: F401
            from sweeps.grid_search import grid_search_next_runs  # noqa: F401
    except ImportError:
        pytest.skip("W&B's sweep engine is not installed (pip install 'wandb[sweeps]')")
    import sweeps

    return sweeps


def grid(sweep: dict) -> list[dict]:
    """Every run of a grid sweep as W&B's run config ({param: {"value": v}}): the cartesian product of the
    parameters' values in the order of the file (W&B's grid search orders its parameters by name)."""
    names = list(sweep["parameters"])
    values = [sweep["parameters"][n]["values"] for n in names]
    return [{n: {"value": v} for n, v in zip(names, combo)} for combo in itertools.product(*values)]


def agent_argv(sweep: dict, run_config: dict) -> list[str]:
    """The command line the W&B agent runs for one run: wandb's own argument formats, substituted into the
    sweep's `command` as wandb/wandb_agent.py does (a macro is a whole list item; other items are literal)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    macros = sweep_utils.create_sweep_command_args({"args": run_config})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    argv: list[str] = []
    for item in map(str, sweep["command"]):
        argv += (macros.get(item[2:-1]) or []) if item.startswith("${") and item.endswith("}") else [item]
    return argv


@contextmanager
def composer():
    """compose(overrides) → the training config, as tests/conftest.py's compose, initialised once for many."""
    import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda overrides: hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


def multirun_jobs(command: str) -> list[list[str]]:
    """`python train.py -m a=1,2 b=3` → each job's overrides, as Hydra's basic sweeper splits them."""
    args = shlex.split(command)
    assert args[:3] == ["python", "train.py", "-m"], command
    overrides = OverridesParser.create().parse_overrides(args[3:])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def documented_multirun(name: str) -> str:
    """The `python train.py -m ...` command in the sweep file's header comment, its lines continued by a final
    backslash joined as the shell joins them (the backslash and newline dropped, the next line's spaces kept)."""
    comments = [line[1:] for line in (SWEEPS / name).read_text().splitlines() if line.startswith("#")]
    starts = [i for i, line in enumerate(comments) if line.strip().startswith("python train.py -m ")]
    assert len(starts) == 1, f"{name}: one Hydra multirun command expected in its comments, found {len(starts)}"
    end = starts[0]
    while comments[end].endswith("\\"):
        end += 1
    return "\n".join(comments[starts[0] : end + 1]).replace("\\\n", "").strip()


def documented_runs(name: str) -> int:
    found = re.search(r"(\d+) runs", (SWEEPS / name).read_text())
    assert found, f"{name}: its comment should give the number of runs"
    return int(found.group(1))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def hydra_value(key: str, value):
    """A swept value as the agent passes it (`key=value`, its str()) and Hydra reads it back."""
    return OverridesParser.create().parse_override(f"{key}={value}").value()


def same(a, b) -> bool:
    """Equal and of the same types, all the way down: 0.999 stays a float, 0 an int."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def settings(key: str, value) -> dict:
    """The settings an override makes: `model.loss={gamma:2,alpha:0.25}` (merged into model.loss by Hydra) sets
    model.loss.gamma and model.loss.alpha."""
    return {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}


# --- the W&B sweep files -----------------------------------------------------------------------------


def test_every_sweep_file_is_checked():
    assert sorted(p.name for p in SWEEPS.glob("*.yaml")) == sorted(PAPER_GRIDS)


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_sweep_file_has_the_documented_structure(name):
    """The structure W&B documents for a sweep config, checked without W&B's engine installed."""
    sweep = load_sweep(name)
    assert sweep["method"] == "grid"
    assert sweep["metric"] == {"name": "val/map", "goal": "maximize"}
    assert (ROOT / sweep["program"]).is_file()
    command = [str(c) for c in sweep["command"]]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"]
    assert command.count("${args_no_hyphens}") == 1  # key=value: Hydra's syntax (${args} would give --key=value)
    for fixed in (c for c in command if not c.startswith("${")):
        assert re.fullmatch(r"[\w./+~-]+=[^\s]+", fixed), f"{name}: fixed override {fixed!r} is not key=value"
    assert "logger=wandb" in command  # the run and its val/map go to the sweep's project
    # the paper's values, in order, as Hydra reads them back: plain numbers (or dicts of them), no None, no strings
    assert list(sweep["parameters"]) == list(PAPER_GRIDS[name])
    for key, expected in PAPER_GRIDS[name].items():
        read = [hydra_value(key, v) for v in sweep["parameters"][key]["values"]]
        assert len(read) == len(expected) and all(map(same, read, expected)), f"{name}: {key} reads {read}"
        assert all(is_number(v) for value in read for v in settings(key, value).values())
    assert documented_runs(name) == math.prod(len(v) for v in PAPER_GRIDS[name].values()) == len(grid(sweep))


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_sweep_file_satisfies_wandb_sweep_schema(name):
    """W&B's sweep-config JSON schema ships with its sweep engine (sweeps/config/schema.json), which is what
    `wandb.controller()` validates with; the W&B server applies the same schema on `wandb sweep`."""
    engine = wandb_sweep_engine()
    sweep = load_sweep(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert engine.schema_violations_from_proposed_config(sweep) == []
        engine.SweepConfig(sweep)  # raises on any violation
        broken = dict(sweep, metric={"name": "val/map", "goal": "maximise"})
        assert engine.schema_violations_from_proposed_config(broken)  # the schema does catch mistakes


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_grid_expands_as_wandb_grid_search(name):
    """Our cartesian product is the set of runs W&B's grid search hands out, each exactly once."""
    wandb_sweep_engine()
    from sweeps.grid_search import grid_search_next_runs

    sweep = load_sweep(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suggested = grid_search_next_runs([], sweep, validate=True, n=1000)
    assert suggested[-1] is None  # the grid ran out
    runs = [r.config for r in suggested[:-1]]
    key = lambda cfg: json.dumps(cfg, sort_keys=True)  # noqa: E731
    assert sorted(map(key, runs)) == sorted(map(key, grid(sweep)))
    assert len(runs) == len({key(r) for r in runs}) == documented_runs(name)


def covering(runs: list[dict]) -> list[dict]:
    """The fewest runs in grid order that between them use every value of every parameter."""
    seen: set = set()
    chosen = []
    for run in runs:
        pairs = {(k, v["value"]) for k, v in run.items()}
        if pairs - seen:
            chosen.append(run)
            seen |= pairs
    return chosen


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_every_run_command_composes_with_the_real_config(name):
    """Each run's argv, as the agent builds it, through Hydra's override parser against the real config:
    every key exists (Hydra refuses unknown keys without +) and every value arrives as the number in the
    sweep file (0.999 stays 0.999, 0 is an int; a dict's entries alike). A full compose for the runs that cover
    every value (the swept keys are plain values, so the other combinations compose alike; 28 composes would
    take seconds)."""
    sweep = load_sweep(name)
    runs = grid(sweep)
    fixed = [str(c) for c in sweep["command"] if not str(c).startswith("${")]
    parser = OverridesParser.create()
    with composer() as compose:
        base = compose(fixed)
        assert "wandb" in base.logger and base.task_name == dict(a.split("=", 1) for a in fixed)["task_name"]
        for run in runs:
            argv = agent_argv(sweep, run)
            assert argv[:3] == AGENT_PREFIX
            assert argv[3:] == fixed + [f"{k}={v['value']}" for k, v in run.items()]
            for override in parser.parse_overrides(argv[3 + len(fixed) :]):
                key, value = override.key_or_group, override.value()
                assert override.type.name == "CHANGE" and not override.is_sweep_override(), override
                for setting, v in settings(key, value).items():
                    assert is_number(OmegaConf.select(base, setting, throw_on_missing=True)), (
                        f"{setting}: not a setting"
                    )
                    assert is_number(v), f"{' '.join(argv[3:])}: Hydra reads {setting} as {v!r}"
                expected = run[key]["value"]
                assert isinstance(expected, str) or same(value, expected), (
                    f"{' '.join(argv[3:])}: Hydra reads {key} as {value!r}, the sweep gives {expected!r}"
                )
        for run in covering(runs):
            cfg = compose(agent_argv(sweep, run)[3:])
            for key, param in run.items():
                for setting, expected in settings(key, hydra_value(key, param["value"])).items():
                    assert same(OmegaConf.select(cfg, setting, throw_on_missing=True), expected), setting


def test_every_ssd_layer_count_builds_and_runs_at_the_sweep_input_size():
    """SSD's Table 3 values 1..6 build the model and run a forward pass at the sweep's input size (at the
    128 px of experiment=ssd_shapes, n = 5 and 6 would fail: conv9_2 is 2×2 there)."""
    sweep = load_sweep("ssd_layers.yaml")
    with composer() as compose, torch.no_grad():
        for run in grid(sweep):
            cfg = compose(agent_argv(sweep, run)[3:])
            n = run["model.num_prediction_layers"]["value"]
            model = instantiate(cfg.model).net.eval()
            size = cfg.data.image_size
            outputs, priors = model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
            assert len(model.backbone.layers) == n
            assert outputs["class_scores"].shape[1] == len(priors.boxes)
            assert abs(len(priors.boxes) - 8732) / 8732 < 0.1  # Table 3 keeps ~8,732 boxes per model


# --- the equivalent Hydra multiruns --------------------------------------------------------------------


def test_focal_loss_multirun_expands_to_28_jobs():
    jobs = multirun_jobs("python train.py -m model.loss.gamma=0,0.1,0.2,0.5,1,2,5 model.loss.alpha=0.25,0.5,0.75,0.999")
    assert len(jobs) == 28
    assert jobs[0] == ["model.loss.gamma=0", "model.loss.alpha=0.25"]
    assert jobs[-1] == ["model.loss.gamma=5", "model.loss.alpha=0.999"]


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_documented_multirun_runs_the_same_settings_as_the_wandb_sweep(name):
    """The sweep file's `python train.py -m ...` command: as many jobs as W&B runs, the same swept settings as
    Hydra reads them, the same fixed overrides but W&B's own (logger, task_name); its first and last jobs compose."""
    sweep = load_sweep(name)
    jobs = multirun_jobs(documented_multirun(name))
    swept = set(sweep["parameters"])
    is_swept = lambda o: o.split("=", 1)[0] in swept  # noqa: E731

    def swept_settings(overrides: list[str]) -> dict:
        found: dict = {}
        for key, _, value in (o.partition("=") for o in overrides if is_swept(o)):
            found.update(settings(key, hydra_value(key, value)))
        return found

    as_text = lambda found: json.dumps(found, sort_keys=True)  # noqa: E731  (keeps 0 apart from 0.0)
    wandb_settings = sorted(as_text(swept_settings(agent_argv(sweep, run)[3:])) for run in grid(sweep))
    assert sorted(as_text(swept_settings(job)) for job in jobs) == wandb_settings
    assert len(jobs) == documented_runs(name)
    fixed = {str(c) for c in sweep["command"] if not str(c).startswith("${")} - {"logger=wandb"}
    fixed = {f for f in fixed if not f.startswith("task_name=")}
    assert all({o for o in job if not is_swept(o)} == fixed for job in jobs)
    with composer() as compose:
        for job in (jobs[0], jobs[-1]):
            cfg = compose(job)
            for key, value in swept_settings(job).items():
                assert same(OmegaConf.select(cfg, key, throw_on_missing=True), value), key


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table_1_sweeps_train_the_papers_gamma_alpha_rows(name):
    """Every W&B run of a Table 1 sweep, its argv as the agent builds it, composed by Hydra and the loss built from
    it: the (γ, α) of the table's rows in the table's order, the rest of the loss and the recipe untouched."""
    sweep = load_sweep(name)
    with composer() as compose:
        recipe = compose(["experiment=retinanet_shapes"])
        rows, untouched = [], {k: v for k, v in recipe.model.loss.items() if k not in ("gamma", "alpha")}
        for run in grid(sweep):
            cfg = compose(agent_argv(sweep, run)[3:])
            assert {k: v for k, v in cfg.model.loss.items() if k not in ("gamma", "alpha")} == untouched
            assert cfg.model.backbone == recipe.model.backbone and cfg.data == recipe.data
            loss = instantiate(cfg.model.loss)
            rows.append((loss.gamma, loss.alpha))
    assert len(rows) == len(TABLE_1[name]) and all(map(same, rows, TABLE_1[name])), rows


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table_1_sweeps_give_the_papers_own_setting(name):
    """The header's overrides for the paper's setting compose to its ablations' model and input: ResNet-50-FPN from
    ImageNet, 600 px for training and testing (Table 1's caption), with the sweep's values on top."""
    found = re.findall(r"^#\s+(experiment=retinanet_r50_coco_1x .*)$", (SWEEPS / name).read_text(), re.M)
    assert len(found) == 1, f"{name}: one line of overrides for the paper's setting expected, found {found}"
    overrides = found[0].replace("data.root=DIR", "data.root=/data/coco").split()
    sweep = load_sweep(name)
    run = grid(sweep)[-1]
    with composer() as compose:
        cfg = compose(overrides + [f"{k}={v['value']}" for k, v in run.items()])
    assert list(cfg.data.train_transform.min_sizes) == [600] and cfg.data.val_transform.min_size == 600
    assert cfg.model.backbone.depth == 50 and cfg.model.backbone.weights == "IMAGENET1K_V1"
    assert same((cfg.model.loss.gamma, cfg.model.loss.alpha), TABLE_1[name][-1])


# --- the Optuna search (hydra-optuna-sweeper) ----------------------------------------------------------


def hparams_search_override(option: str) -> str:
    """`hparams_search=...` once conf/train.yaml lists the group in its defaults, `+hparams_search=...` before."""
    defaults = yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["defaults"]
    listed = any(isinstance(d, dict) and "hparams_search" in d for d in defaults)
    return f"{'' if listed else '+'}hparams_search={option}"


def test_optuna_focal_loss_search_composes():
    pytest.importorskip("optuna", reason="pip install hydra-optuna-sweeper")
    impl = pytest.importorskip("hydra_plugins.hydra_optuna_sweeper._impl", reason="pip install hydra-optuna-sweeper")
    create_params_from_overrides = impl.create_params_from_overrides
    from optuna.distributions import UniformDistribution

    with composer() as compose:
        cfg = compose([hparams_search_override("focal_loss_optuna"), "experiment=retinanet_shapes"])
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert sweeper.n_trials > 0 and cfg.optimized_metric == "val/map" and cfg.hydra.mode.name == "MULTIRUN"
        params = dict(sweeper.params)
        assert set(params) == {"model.loss.gamma", "model.loss.alpha"}
        for key in params:  # the search space's keys are real settings of the composed config
            assert is_number(OmegaConf.select(cfg, key, throw_on_missing=True))
        # the search space as the plugin reads it: continuous ranges over the paper's grid
        distributions, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
        assert fixed == {}
        gamma, alpha = distributions["model.loss.gamma"], distributions["model.loss.alpha"]
        assert isinstance(gamma, UniformDistribution) and (gamma.low, gamma.high) == (0.0, 5.0)  # Table 1b's γ
        assert isinstance(alpha, UniformDistribution) and (alpha.low, alpha.high) == (0.01, 0.999)  # §5.1's tested α
        for g, a in TABLE_1["focal_loss_table1a.yaml"] + TABLE_1["focal_loss_table1b.yaml"]:  # α = .10 included
            assert gamma.low <= g <= gamma.high and alpha.low <= a <= alpha.high
        # a trial's job: the sampled values as overrides on top of the search's config
        trial = compose(
            [
                hparams_search_override("focal_loss_optuna"),
                "experiment=retinanet_shapes",
                "model.loss.gamma=3.7",
                "model.loss.alpha=0.61",
            ]
        )
        assert (trial.model.loss.gamma, trial.model.loss.alpha) == (3.7, 0.61)


# --- sweeps/summarize.py ----------------------------------------------------------------------------------


def load_summarize():
    spec = importlib.util.spec_from_file_location("sweeps_summarize", SWEEPS / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fake_job(folder: Path, overrides: list[str], metrics: dict | None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))


def test_summarize_tabulates_a_multirun_best_first(tmp_path, capsys):
    summarize = load_summarize()
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00"
    task = ["experiment=retinanet_shapes", "model.loss.gamma=0,2", "model.loss.alpha=0.25,0.5"]
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
                    "overrides": {"task": task},
                }
            }
        )
    )
    fixed = ["experiment=retinanet_shapes"]
    fake_job(
        sweep / "0",
        fixed + ["model.loss.gamma=0", "model.loss.alpha=0.25"],
        {"val/map": 0.30, "val/map_50": 0.55, "val/map_75": 0.2},
    )
    fake_job(sweep / "1", fixed + ["model.loss.gamma=0", "model.loss.alpha=0.5"], {"val/map": 0.45, "val/map_50": 0.71})
    fake_job(sweep / "2", fixed + ["model.loss.gamma=2", "model.loss.alpha=0.25"], None)  # crashed
    # job 3 never started: no folder

    assert summarize.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    assert header == ["job", "model.loss.gamma", "model.loss.alpha", "val/map", "val/map_50", "note"]  # swept only
    assert [row.split("|")[1].strip() for row in table[1:]] == ["1", "0", "2"]  # best first, no metrics last
    assert "0.4500" in table[1] and "0.7100" in table[1]
    assert summarize.NO_METRICS in table[3]
    assert "2 of 3 job folders have metrics.json" in out
    assert "launches 4 jobs: 1 never started" in out

    assert (sweep / "summary.md").read_text().splitlines()[2:7] == out.splitlines()[2:7]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["1", "0", "2"]
    assert float(rows[0]["val/map"]) == 0.45 and rows[0]["model.loss.alpha"] == "0.5"
    assert rows[2]["val/map"] == "" and rows[2]["note"] == summarize.NO_METRICS


def test_summarize_reads_wandb_agent_run_folders_and_other_metrics(tmp_path, capsys):
    """A W&B agent's runs are single runs side by side (runs/<task_name>/<date>_<time>); --metric picks columns."""
    summarize = load_summarize()
    fixed = ["experiment=ssd_shapes", "data.image_size=300", "logger=wandb", "task_name=ssd_layers_sweep"]
    for i, (n, m) in enumerate([(6, 0.61), (1, 0.40), (4, 0.70)]):
        fake_job(
            tmp_path / f"2026-01-01_00-00-0{i}",
            fixed + [f"model.num_prediction_layers={n}"],
            {"val/map": m, "val/map_50": m + 0.2},
        )
    summary = summarize.summarize(tmp_path, metrics=("val/map_50",))
    assert summary.keys == ["model.num_prediction_layers"]  # what differs between the runs
    assert [j.overrides["model.num_prediction_layers"] for j in summary.jobs] == ["4", "6", "1"]
    assert summarize.main([str(tmp_path), "--metric", "val/map", "--minimize"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2026")]
    assert "0.4000" in rows[0] and "0.7000" in rows[-1]  # smallest first
    assert summarize.main([str(tmp_path / "empty")]) == 1  # no jobs: an error, not an empty table


def test_summarize_over_seeds_gives_each_settings_mean_and_spread(tmp_path, capsys):
    summarize = load_summarize()
    runs = [("0", "1", 0.30, 2.0), ("0", "2", 0.40, 4.0), ("2", "1", 0.50, 3.0), ("2", "2", None, None)]
    for i, (gamma, seed, value, minutes) in enumerate(runs):
        job = tmp_path / str(i)
        fake_job(job, [f"model.loss.gamma={gamma}", f"seed={seed}"], None if value is None else {"val/map": value})
        if minutes is not None:  # the CSV log's clock: the last time/train_min counts
            (job / "csv").mkdir()
            (job / "csv" / "metrics.csv").write_text(f"step,time/train_min\n10,{minutes / 2}\n20,{minutes}\n")
    assert summarize.main([str(tmp_path), "--metric", "val/map", "--over", "seed"]) == 0
    table = (tmp_path / "summary_over_seed.md").read_text().splitlines()
    assert table[0] == "| model.loss.gamma | val/map | runs | train min |"
    assert table[2] == "| 2 | 0.5000 (0.5000–0.5000) | 1 of 2 (seed 1) | 3.0 |"  # the best run's setting first
    assert table[3] == "| 0 | 0.3500 (0.3000–0.4000) | 2 of 2 (seed 2, 1) | 3.0 |"
    assert "over seed:" in capsys.readouterr().out


def results_commands() -> list[tuple[str, list[str]]]:
    """(file, train.py's arguments) of every ```bash command in sweeps/results/*.md that runs train.py."""
    found = []
    for md in sorted((SWEEPS / "results").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", md.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line)
                if "train.py" in words:
                    found.append((md.name, words[words.index("train.py") + 1 :]))
    return found


@pytest.mark.parametrize(("name", "args"), results_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_committed_result_command_still_composes(name, args):
    """A table's re-run command must still mean what ran: each of its jobs composes with today's configs."""
    from .conftest import compose

    parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert len(jobs) > 1, f"{name}: a results table comes from a multirun (-m)"
    for job in jobs:
        compose(*job)
