"""Time to accuracy of a training recipe: ``python -m bench.time_to_accuracy [--isa both] [OVERRIDES ...]``.

Runs ``python train.py experiment=retinanet_shapes OVERRIDES`` (what ``make train`` runs) once per instruction set
asked for, each in its own process, and prints validation mAP@0.5 against wall minutes: the minutes of fitting at
each validation and the whole command's wall time (start-up and the final re-validation included), with the CPU
and the instruction set the run used. ``--isa avx2`` runs with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``, what an AVX2-only CPU gets (its kernels and its float rounding); ``--isa both`` runs the
native one and then AVX2 (once, where the CPU is AVX2 already). Writes each run's curve beside its run folder
(``time_to_accuracy.png``). A benchmark, not a test: the figures hold for the machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine.machine import cpu_model

from .training_curve import plot_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_recipe(recipe: str, overrides: list[str], env_extra: dict[str, str]) -> tuple[Path, float, str]:
    """Train once in a child process; (its run folder, its wall seconds, the ISA torch reported there)."""
    env = {**os.environ, **env_extra}
    env.setdefault("WANDB_MODE", "disabled")
    isa = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    command = [sys.executable, str(ROOT / "train.py"), f"experiment={recipe}", *overrides]
    print(f"[{isa}] {' '.join(command[1:])}", flush=True)
    start = time.monotonic()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"train.py failed with exit code {done.returncode}")
    found = re.findall(r"run folder: (.+)", done.stdout)
    if not found:
        raise SystemExit("train.py did not print its run folder")
    return Path(found[-1].strip()), seconds, isa


def report(run_dir: Path, seconds: float, isa: str, target: float) -> dict:
    rows = [r for r in read_metrics(run_dir) if "val/map_50" in r and "time/train_min" in r]
    print(f"\n{cpu_model()}, {isa}, {torch.get_num_threads()} threads; {run_dir}")
    print("| epoch | fitting minutes | val mAP@0.5 | val mAP@[.5:.95] |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {int(r['epoch']) + 1} | {r['time/train_min']:.1f} | {r['val/map_50']:.3f} | {r['val/map']:.3f} |")
    reached = next((r["time/train_min"] for r in rows if r["val/map_50"] >= target), None)
    best = max((r["val/map_50"] for r in rows), default=float("nan"))
    print(
        f"whole command: {seconds / 60:.1f} min wall; best val mAP@0.5 {best:.3f}; "
        + (f"≥ {target} after {reached:.1f} fitting minutes" if reached is not None else f"never ≥ {target}")
    )
    print(plot_run(run_dir, run_dir / "time_to_accuracy.png", f"{run_dir.parent.name} on {cpu_model()}, {isa}"))
    return {
        "run_dir": str(run_dir),
        "isa": isa,
        "wall_min": seconds / 60,
        "best_map_50": best,
        "target_reached_min": reached,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="retinanet_shapes", help="experiment=<recipe> (default: make train's)")
    parser.add_argument("--isa", choices=("native", "avx2", "both"), default="native")
    parser.add_argument("--target", type=float, default=0.7, help="the val mAP@0.5 to time (default 0.7)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. trainer.max_epochs=2")
    args = parser.parse_args(argv)
    native = torch.backends.cpu.get_cpu_capability()
    runs = {"native": [{}], "avx2": [AVX2_ENV], "both": [{}] if native == "AVX2" else [{}, AVX2_ENV]}[args.isa]
    return [report(*run_recipe(args.recipe, args.overrides, env), args.target) for env in runs]


if __name__ == "__main__":
    main()
