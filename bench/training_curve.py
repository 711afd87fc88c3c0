"""Plot a run's learning curve from its CSV log: ``python -m bench.training_curve RUN_DIR [OUT.png]``.

Several runs on one axes (validation mAP@0.5 against wall minutes, one line a run, named by its task):
``python -m bench.training_curve --compare RUN_DIR RUN_DIR ... --out OUT.png``; the README's BCCD figure.

Left: training loss (and its focal/box parts) by step; right: validation mAP@0.5 and mAP@[.5:.95] against
wall minutes of training (``time/train_min``, logged by ``engine.callbacks.TrainingTime``), or by
epoch for runs without it. This is how the README's "mAP@0.5 ≥ 0.7 within 10 minutes" figure is made.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


TERM_NAMES = {
    "train/loss_cls": "classification",
    "train/loss_box": "box regression",
    "train/loss_obj": "confidence (objects)",
    "train/loss_noobj": "confidence (no object)",
}


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CSV log in this run folder (was it trained with logger=csv or many?)")
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: Path, out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/map_50" in r]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    # the total, then every term the detector logs (RetinaNet/SSD: cls, box; YOLO: box, obj, noobj, cls)
    terms = sorted({k for r in train for k in r if k.startswith("train/loss_")})
    for key in ["train/loss", *terms]:
        label = "total" if key == "train/loss" else TERM_NAMES.get(key, key.removeprefix("train/"))
        values = [r[key] for r in train if key in r]
        if len(values) == len(steps) and values:
            ax_loss.plot(steps, smooth(values, 10), label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (moving average of 10 logs)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    # validations during fitting carry the clock; the re-validation of best.ckpt after fitting does not
    timed = any("time/train_min" in r for r in val)
    if timed:
        val = [r for r in val if "time/train_min" in r]
    xs = [r["time/train_min"] if timed else r["epoch"] + 1 for r in val]
    for key, label in (("val/map_50", "mAP@0.5"), ("val/map", "mAP@[.5:.95]")):
        ys = [r.get(key, math.nan) for r in val]
        ax_map.plot(xs, ys, marker="o", label=label)
        if ys:
            ax_map.annotate(f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-10, 6))
    ax_map.set(
        xlabel="training wall time (min)" if timed else "epoch",
        ylabel="validation",
        ylim=(0, 1),
        title="validation mAP",
    )
    ax_map.legend(loc="lower right")
    ax_map.grid(alpha=0.3)
    fig.suptitle(title or run_label(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def timed_validations(run_dir: Path) -> list[dict[str, float]]:
    """The validations made during fitting, each with its wall minute (not the re-validation of best.ckpt)."""
    return [r for r in read_metrics(run_dir) if "val/map_50" in r and "time/train_min" in r]


def run_label(run_dir: Path) -> str:
    """A run's name on a plot: its task and seed from the config train.py saved (``.hydra/config.yaml``), else the
    folder above it (``runs/<task>/<date>_<time>``); runs kept elsewhere (``hydra.run.dir``) still name their task."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        task, seed = cfg.get("task_name"), cfg.get("seed")
        if task:
            return f"{task}, seed {seed}" if seed is not None else str(task)
    return run_dir.parent.name


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run_dir in run_dirs:
        val = timed_validations(run_dir)
        if not val:
            raise ValueError(f"{run_dir}: no validation with time/train_min in its CSV log (a run of train.py?)")
        xs, ys = [r["time/train_min"] for r in val], [r["val/map_50"] for r in val]
        # the last value in the legend: labels beside the lines' ends overlap where runs end close together
        ax.plot(xs, ys, marker="o", label=f"{run_label(run_dir)}: {ys[-1]:.3f}")
    ax.set(xlabel="training wall time (min)", ylabel="validation mAP@0.5", ylim=(0, 1), title=title or "")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.training_curve", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a run folder, e.g. runs/retinanet_shapes/<date>")
    parser.add_argument("out", type=Path, nargs="?", help="PNG to write (default: <run_dir>/training_curve.png)")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR", help="several runs on one plot")
    parser.add_argument("--out", dest="compare_out", type=Path, default=Path("curves.png"), help="with --compare")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.compare:
        print(plot_runs(args.compare, args.compare_out, args.title))
    elif args.run_dir is None:
        parser.error("give a run folder, or --compare RUN_DIR ...")
    else:
        print(plot_run(args.run_dir, args.out or args.run_dir / "training_curve.png", args.title))


if __name__ == "__main__":
    main()
