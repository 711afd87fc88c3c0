"""Tabulate a finished sweep: `python sweeps/summarize.py runs/retinanet_shapes/multirun/<date>_<time>`.

Every folder under DIR with a `.hydra/overrides.yaml` is a job: the jobs of a Hydra multirun (Optuna's too),
or the single runs a W&B agent started (e.g. `runs/focal_loss_sweep`). Prints one table, best first: the
overrides that differ between jobs → val/map, val/map_50 (from each job's metrics.json); jobs without
metrics.json (failed or unfinished) come last, marked. Writes the table to DIR/summary.md and DIR/summary.csv.

    python sweeps/summarize.py DIR [--metric val/map --metric val/map_50 ...] [--minimize] [--over seed]

``--over seed`` adds a table of the settings over their seeds (mean, lowest–highest, how many finished, mean
training minutes from the run's CSV log): the spread a re-run should land in. Written to DIR/summary_over_seed.md.

(A script, not a package: a `sweeps` package here would shadow W&B's sweep engine, also named `sweeps`.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = ("val/map", "val/map_50")
NO_METRICS = "no metrics.json: failed or unfinished"


@dataclass
class Job:
    name: str  # folder relative to the sweep folder ("3", "2026-11-25_10-00-00")
    overrides: dict[str, str]  # key → value as given on the command line
    metrics: dict[str, float] | None  # metrics.json, None if missing or unreadable
    note: str = ""


@dataclass
class Summary:
    root: Path
    keys: list[str]  # the overrides that differ between jobs: the swept settings
    metrics: list[str]
    jobs: list[Job]  # sorted: best first, jobs without metrics last
    notes: list[str] = field(default_factory=list)


def _natural_key(name: str) -> list[Any]:
    # job "10" after job "9"
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def parse_override(text: str) -> tuple[str, str]:
    """`model.loss.gamma=0.5` → (model.loss.gamma, 0.5); `+key=v`/`++key=v` keep the key, `~key` deletes."""
    if text.startswith("~"):
        key, _, value = text[1:].partition("=")
        return key, f"~{value}" if value else "~"
    key, _, value = text.partition("=")
    return key.lstrip("+"), value


def read_job(folder: Path, root: Path) -> Job:
    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
    name = folder.relative_to(root).as_posix()
    job = Job(name=name, overrides=dict(parse_override(str(o)) for o in overrides), metrics=None)
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        job.note = NO_METRICS
        return job
    try:
        job.metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as e:  # a half-written file from a killed job
        job.note = f"unreadable metrics.json ({type(e).__name__})"
    return job


def find_jobs(root: Path) -> list[Path]:
    found = {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def expected_jobs(root: Path) -> int | None:
    """How many jobs the multirun launched, from its multirun.yaml (basic sweeper: the product of its
    sweeps; Optuna: n_trials); None where there is no multirun.yaml or it cannot be expanded."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        hydra_cfg = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
        sweeper = hydra_cfg.get("sweeper") or {}
        target = str(sweeper.get("_target_", ""))
        if target.endswith("OptunaSweeper"):
            return int(sweeper["n_trials"])
        if not target.endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += list(hydra_cfg.get("overrides", {}).get("task") or [])
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
        return sum(len(b) for b in batches)
    except Exception:  # noqa: BLE001  (glob sweeps etc. need the config; the count is only a hint)
        return None


def summarize(root: Path, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS, maximize: bool = True) -> Summary:
    root = Path(root)
    jobs = [read_job(folder, root) for folder in find_jobs(root)]
    if not jobs:
        raise FileNotFoundError(f"{root}: no job folders (none with .hydra/overrides.yaml) below it")
    keys: list[str] = []
    for job in jobs:  # in first-seen order, as typed on the command line
        keys += [k for k in job.overrides if k not in keys]
    varying = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    keys = varying or keys  # a single job (or identical ones): show what it was run with

    first = metrics[0]
    sign = -1.0 if maximize else 1.0

    def order(job: Job) -> tuple[int, float, list[Any]]:
        value = (job.metrics or {}).get(first)
        missing = value is None or math.isnan(value)
        return (1 if missing else 0, 0.0 if missing else sign * value, _natural_key(job.name))

    jobs.sort(key=order)
    for job in jobs:
        if job.metrics is not None and first not in job.metrics and not job.note:
            job.note = f"no {first} in metrics.json"
    summary = Summary(root=root, keys=keys, metrics=list(metrics), jobs=jobs)

    done = sum(job.metrics is not None for job in jobs)
    summary.notes.append(f"{done} of {len(jobs)} job folders have metrics.json")
    expected = expected_jobs(root)
    if expected is not None and expected != len(jobs):
        summary.notes.append(f"multirun.yaml launches {expected} jobs: {expected - len(jobs)} never started")
    best_file = root / "optimization_results.yaml"
    if best_file.is_file():  # Optuna's result: best parameters and value
        best = yaml.safe_load(best_file.read_text()) or {}
        summary.notes.append(f"Optuna best: {best.get('best_params')} → {best.get('best_value')}")
    return summary


def training_minutes(folder: Path) -> float | None:
    """The run's last ``time/train_min`` (engine.callbacks.TrainingTime) from its CSV log, if it has one."""
    path = folder / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        values = [float(r["time/train_min"]) for r in csv.DictReader(f) if r.get("time/train_min")]
    return values[-1] if values else None


def over(summary: Summary, key: str) -> str:
    """A markdown table of the settings (the swept keys but ``key``) over ``key``'s values: each metric's mean and
    lowest–highest, the number of finished runs and their mean training minutes; in the summary's order of
    the best run of each setting."""
    settings = [k for k in summary.keys if k != key]
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in summary.jobs:
        groups.setdefault(tuple(job.overrides.get(k, "") for k in settings), []).append(job)
    header = [*settings, *summary.metrics, "runs", "train min"]
    body = []
    for setting, jobs in groups.items():
        done = [j for j in jobs if j.metrics is not None]
        cells = list(setting)
        for m in summary.metrics:
            values = [j.metrics[m] for j in done if m in j.metrics]
            mean = sum(values) / len(values) if values else None
            cells.append(f"{_fmt(mean)} ({_fmt(min(values))}–{_fmt(max(values))})" if values else "")
        minutes = [t for j in done if (t := training_minutes(summary.root / j.name)) is not None]
        seeds = ", ".join(j.overrides.get(key, "?") for j in done)
        cells += [
            f"{len(done)} of {len(jobs)} ({key} {seeds})",
            f"{sum(minutes) / len(minutes):.1f}" if minutes else "",
        ]
        body.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def rows(summary: Summary) -> list[list[str]]:
    header = ["job", *summary.keys, *summary.metrics, "note"]
    body = [
        [
            job.name,
            *(job.overrides.get(k, "") for k in summary.keys),
            *(_fmt((job.metrics or {}).get(m)) for m in summary.metrics),
            job.note,
        ]
        for job in summary.jobs
    ]
    return [header, *body]


def to_markdown(summary: Summary) -> str:
    table = rows(summary)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    numeric = {i for i, h in enumerate(table[0]) if h in summary.metrics}

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    text = [f"Sweep {summary.root}", "", line(table[0]), rule, *(line(r) for r in table[1:]), ""]
    return "\n".join(text + summary.notes) + "\n"


def write_csv(summary: Summary, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *summary.keys, *summary.metrics, "note"])
        for job in summary.jobs:  # full precision here; the markdown rounds
            writer.writerow(
                [
                    job.name,
                    *(job.overrides.get(k, "") for k in summary.keys),
                    *("" if (v := (job.metrics or {}).get(m)) is None else repr(v) for m in summary.metrics),
                    job.note,
                ]
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folder",
        type=Path,
        help="a multirun folder (runs/<task>/multirun/<date>_<time>) or any folder holding run folders",
    )
    parser.add_argument(
        "--metric", action="append", help=f"metric column(s), the first sorts (default: {' '.join(DEFAULT_METRICS)})"
    )
    parser.add_argument("--minimize", action="store_true", help="smallest first (for a loss)")
    parser.add_argument("--over", metavar="KEY", help="also a table of each setting over KEY's values (e.g. seed)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.folder, tuple(args.metric or DEFAULT_METRICS), maximize=not args.minimize)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    text = to_markdown(summary)
    print(text, end="")
    (args.folder / "summary.md").write_text(text)
    write_csv(summary, args.folder / "summary.csv")
    print(f"written: {args.folder / 'summary.md'}, {args.folder / 'summary.csv'}")
    if args.over:
        table = over(summary, args.over)
        print(f"\nover {args.over}:\n{table}", end="")
        (args.folder / f"summary_over_{args.over}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
