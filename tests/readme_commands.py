"""README.md's commands: extraction, the generic rules that shorten them to a step or two, and an in-process runner.

Extraction uses markdown-it-py (a maintained CommonMark parser, already installed with rich) for the fenced
```bash and ```python blocks. pytest-examples, mktestdocs and phmdoctest were looked at first: they run a block
as written (python only, or a bash block as one shell script), with no hook to rewrite a command before it runs,
and shortening every training command is what this test needs; so they parse nothing we could use.

`python tests/readme_commands.py plan.json results.json` runs the planned commands one after another in one
interpreter (train.py & co. through runpy with sys.argv set, as `python train.py ...` would; Hydra clears its
global state after each run), so the ~9 s of torch/Lightning imports are paid once. Results are written after
each command, so a crash or timeout still reports the commands before it.
"""

from __future__ import annotations

import glob
import inspect
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED_DATA = ROOT.parent / "shared" / "data"
VOC_SAMPLE = SHARED_DATA / "voc2012-sample" / "VOCdevkit"
COCO_SAMPLE = SHARED_DATA / "coco2017-sample"
REFERENCE_EXPERIMENT = "yolo_shapes"  # the test's own tiny run that `<run>` and `...` placeholders point at
PLACEHOLDER = re.compile(r"<[^<>\n]+>")


# --- extraction ------------------------------------------------------------------------------------------------
@dataclass
class Command:
    line: int  # 1-based README line where the command starts
    text: str  # as written, continuation lines joined, the comment dropped
    argv: list[str]  # shell words (quotes removed), environment assignments left out
    env: dict[str, str] = field(default_factory=dict)
    comment: str = ""  # what follows `#` on the line
    lang: str = "bash"  # bash | python (a ```python block is one command: its code)
    script: list[str] = field(default_factory=list)  # a `#!` block's directive lines (#SBATCH ...)

    @property
    def id(self) -> str:
        short = self.text if self.lang == "bash" else "```python block"
        return f"L{self.line}: {short[:70]}"


def words(text: str) -> tuple[list[str], str]:
    """Shell words of one logical line and its comment: `#` starts a comment only at the start of a word, as in
    bash; `<placeholders with spaces>` stay one word."""
    text = PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), text)
    lexer = shlex.shlex(text, posix=False)  # quotes kept, to tell a quoted '#' from a comment
    lexer.whitespace_split, lexer.commenters = True, ""
    raw = list(lexer)
    cut = next((i for i, w in enumerate(raw) if w.startswith("#")), len(raw))
    comment = text[text.index(raw[cut]) :].lstrip("#").strip() if cut < len(raw) else ""
    return [shlex.split(w)[0] if w[0] in "'\"" or "'" in w or '"' in w else w for w in raw[:cut]], comment


def logical_lines(content: str, first_line: int) -> list[tuple[int, str]]:
    """(README line, text) of each line with its `\\` continuations joined."""
    out, buf, start = [], "", None
    for i, line in enumerate(content.splitlines()):
        if start is None:
            start = first_line + i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    return out


def readme_commands(path: Path = README) -> list[Command]:
    """Every command of the README's ```bash blocks (one per `&&`-joined part) and each ```python block."""
    from markdown_it import MarkdownIt

    commands = []
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type != "fence":
            continue
        lang, first = token.info.strip().split()[0] if token.info.strip() else "", token.map[0] + 2
        if lang == "python":
            commands.append(Command(first, token.content, ["python", "-"], lang="python"))
            continue
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        directives = [
            ln
            for ln in token.content.splitlines()
            if ln.startswith("#") and not ln.startswith("# ") and ln.strip() != "#"
        ]
        script = directives if token.content.startswith("#!") else []
        for line, text in logical_lines(token.content, first):
            if not text.strip() or text.lstrip().startswith("#"):
                continue  # comment lines and a script's #! / #SBATCH directives
            argv, comment = words(text)
            parts = [list(g) for is_sep, g in itertools.groupby(argv, lambda w: w in ("&&", ";", "||")) if not is_sep]
            for part in parts:
                env = {}
                while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                    key, _, value = part.pop(0).partition("=")
                    env[key] = value
                commands.append(Command(line, " ".join(part), part, env, comment, script=script))
    return commands


# --- sweeps ----------------------------------------------------------------------------------------------------
def sweep_values(override: str) -> list[str] | None:
    """The values of a `key=a,b,c` sweep override (Hydra's own parser), None for a plain override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(override)
    return [str(v) for v in parsed.sweep_string_iterator()] if parsed.is_sweep_override() else None


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides of a Hydra multirun, as the basic sweeper expands them (cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([a for a in overrides if not a.startswith("-")])
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for job in batch]


# --- the runner (a separate interpreter: python tests/readme_commands.py plan.json results.json) -----------------
def newest(pattern: str, workdir: Path) -> str:
    found = sorted(
        (Path(p) for p in glob.glob(str(workdir / pattern), recursive=True)), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise FileNotFoundError(f"placeholder: nothing matches {pattern} in the test's folder")
    return str(found[-1].relative_to(workdir))


def run_data_target(run_folder: Path) -> str | None:
    from omegaconf import OmegaConf

    config = run_folder / ".hydra" / "config.yaml"
    return OmegaConf.load(config).data.get("_target_") if config.is_file() else None


def checkpoint_for(data_target: str | None, workdir: Path) -> str:
    """`ckpt_path=...`: the newest best.ckpt this test trained on the command's data (the reference run by
    default); a checkpoint of other classes would be refused, as the README says."""
    if data_target is None:
        return newest(f"runs/{REFERENCE_EXPERIMENT}/*/checkpoints/best.ckpt", workdir)
    runs = sorted(workdir.glob("runs/**/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ckpt in runs:
        if run_data_target(ckpt.parent.parent) == data_target:
            return str(ckpt.relative_to(workdir))
    raise FileNotFoundError(f"ckpt_path=...: no checkpoint trained on {data_target} by an earlier README command")


def resolve_placeholders(args: list[str], workdir: Path, data_target: str | None) -> list[str]:
    """`<run>`, `<date>_<time>`: the newest existing match of the path with `*` there; `...`: the reference run
    (`experiment=...` → its experiment, `ckpt_path=...` → its best.ckpt, `runs/.../x` → its file x)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            key, value = "", arg
        if value == "..." and key == "ckpt_path":
            value = checkpoint_for(data_target, workdir)
        elif value == "..." and key == "experiment":
            value = REFERENCE_EXPERIMENT
        elif arg == "...":
            key, eq, value = "experiment", "=", REFERENCE_EXPERIMENT
        elif "..." in value:
            value = newest(value.replace("...", f"{REFERENCE_EXPERIMENT}/**"), workdir)
        elif PLACEHOLDER.search(value):
            value = newest(PLACEHOLDER.sub("*", value), workdir)
        out.append(f"{key}{eq}{value}")
    return out


def make_photos(folder: Path, count: int = 2) -> None:
    """An `input=<folder>/` of predict.py: two 128 px shapes images (what the reference model was trained on)."""
    from PIL import Image

    from datamodules.shapes import SHAPE_CLASSES, render_shapes_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, _, _ = render_shapes_image(700 + i, 128, SHAPE_CLASSES, 1, 4, 10, 0.8)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"photo{i}.jpg")


def stand_in_weights(code: str, torch_home: Path) -> list[str]:
    """Each torchvision `<Model>_Weights.<NAME>` the code names, as random weights of the same architecture in
    torch.hub's cache under ``torch_home``, which torch.hub reads instead of downloading."""
    import torch
    import torchvision

    made = []
    for enum_name, member in set(re.findall(r"(\w+_Weights)\.(\w+)", code)):
        for name in torchvision.models.list_models():
            weights_enum = torchvision.models.get_model_weights(name)
            if weights_enum.__name__ != enum_name:
                continue
            weights = weights_enum[member]
            target = torch_home / "hub" / "checkpoints" / Path(weights.url).name
            if not target.exists():
                kwargs = {"num_classes": len(weights.meta["categories"])} if "categories" in weights.meta else {}
                if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
                    kwargs["weights_backbone"] = None
                model = torchvision.models.get_model(name, weights=None, **kwargs)
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), target)
            made.append(target.name)
            break
    return made


KINDS_RUN: dict[tuple, str] = {}  # kind → the first command of that kind, which ran


class SameKind(Exception):
    """A training command of a kind an earlier README command ran: checked by composing and instantiating."""


def kind_of(cfg, args: list[str]) -> tuple:
    """What makes a training command run different code: the network, the data module, the training transform,
    multirun and its sweeper, resuming, fine-tuning, fast_dev_run. The first command of each kind runs; the
    others are composed (with their shortening) and their model and data module built, without training."""
    from omegaconf import OmegaConf

    def get(key):
        return str(OmegaConf.select(cfg, key, default=None))

    return (
        get("model.backbone._target_"),
        get("model.head._target_"),
        get("data._target_"),
        get("data.train_transform._target_"),
        "-m" in args,
        get("hydra.sweeper._target_") if "-m" in args else "",
        get("ckpt_path") != "None",
        get("model.finetune_from") != "None",
        get("trainer.fast_dev_run"),
    )


def build_same_kind(args: list[str]) -> str:
    """Compose the (shortened) command as train.py would and build its model and data module."""
    from hydra.utils import instantiate

    cfg = compose_train(args)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    return f"{type(model).__name__} ({sum(p.numel() for p in model.parameters())} weights), {type(data).__name__}"


class SampleAbsent(Exception):
    """The command's data is one of ../shared/data's samples, and it is not there."""


def coco_fixture(train_split: str, val_split: str, classes: list[str], workdir: Path) -> Path:
    """A COCO-format folder with the command's split names and classes, made from the COCO sample (train2017 for
    its training split, val2017 for its validation split): the images holding those classes, their boxes."""
    folder = workdir / "data" / f"coco_{train_split}_{val_split}_{'_'.join(classes)}".replace(" ", "-")
    for split, source in ((train_split, "train2017"), (val_split, "val2017")):
        data = json.loads((COCO_SAMPLE / "annotations" / f"instances_{source}.json").read_text())
        cats = [c for c in data["categories"] if c["name"] in classes]
        kept = {a["image_id"] for a in data["annotations"] if a["category_id"] in {c["id"] for c in cats}}
        data = {
            "images": [im for im in data["images"] if im["id"] in kept],
            "categories": cats,
            "annotations": [a for a in data["annotations"] if a["category_id"] in {c["id"] for c in cats}],
        }
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (folder / split).mkdir(exist_ok=True)
        for im in data["images"]:
            link = folder / split / im["file_name"]
            if not link.exists():
                link.symlink_to(COCO_SAMPLE / source / im["file_name"])
    return folder


def data_fixture(cfg, args: list[str], workdir: Path) -> list[str]:
    """`data.root=...` of a VOC or COCO command → the real samples in ../shared/data: the VOC2012 sample (its 2012
    train/val splits for sets it lacks: it has no VOC2007), the COCO2017 sample, or a COCO-format set made from it
    with the command's split names and classes."""
    target = str(cfg.data.get("_target_", "")) if cfg.get("data") else ""
    own = {a.partition("=")[0] for a in args}
    extra = []
    if target.endswith("VOCDataModule"):
        if not VOC_SAMPLE.is_dir():
            raise SampleAbsent(f"{VOC_SAMPLE} is absent")
        extra.append(f"data.root={VOC_SAMPLE}")
        for key, split in (("data.train_sets", "train"), ("data.val_sets", "val")):
            sets = cfg.data.get(key.split(".")[1])
            if (
                key not in own
                and sets is not None
                and not all((VOC_SAMPLE / f"VOC{y}" / "ImageSets" / "Main" / f"{s}.txt").is_file() for y, s in sets)
            ):
                extra.append(f"{key}=[[2012,{split}]]")
    elif target.endswith("COCODataModule"):
        if not COCO_SAMPLE.is_dir():
            raise SampleAbsent(f"{COCO_SAMPLE} is absent")
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            default = compose("train", overrides=["data=coco"]).data
        d = cfg.data
        if (d.train_split, d.val_split, list(d.classes)) == ("train2017", "val2017", list(default.classes)):
            extra.append(f"data.root={COCO_SAMPLE}")
        else:
            extra.append(f"data.root={coco_fixture(d.train_split, d.val_split, list(d.classes), workdir)}")
    return [a for a in args if not a.startswith("data.root=")] + extra


def run_one(spec: dict, workdir: Path) -> dict:
    """Run one planned command in this interpreter; its exit code, output tail and the files it created."""
    import contextlib
    import io
    import runpy

    before = {p for p in workdir.rglob("*") if p.is_file()}
    out = io.StringIO()
    result: dict = {"id": spec["id"]}
    started = time.perf_counter()
    saved_env = dict(os.environ)
    os.environ.update(spec.get("env", {}))
    try:
        args = prepare(spec, workdir)
        result["args"] = args
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if spec["kind"] == "python-block":
                result["weights"] = stand_in_weights(spec["code"], workdir / "torch_home")
                os.environ["TORCH_HOME"] = str(workdir / "torch_home")
                namespace = {"__name__": "__main__"}
                # compiled as README.md's code, so Hydra's config_path="conf" is relative to the repository root
                exec(compile(spec["code"], str(README), "exec"), namespace)
                result["check"] = eval(spec["check"], namespace) if spec.get("check") else None
            else:
                sys.argv = [spec["program"], *args]
                if spec["program"].startswith("-m "):
                    runpy.run_module(spec["program"][3:], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / spec["program"]), run_name="__main__")
        result["rc"] = 0
    except SampleAbsent as e:
        result["rc"], result["skip"] = None, str(e)
    except SameKind as e:
        result["same_kind_as"], result["args"] = e.args
        try:
            result["built"], result["rc"] = build_same_kind(e.args[1]), 0
        except Exception as error:  # noqa: BLE001  (reported to the test, which fails with it)
            result["rc"] = f"{type(error).__name__}: {error}"
    except SystemExit as e:
        result["rc"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001  (reported to the test, which fails with it)
        import traceback

        out.write(traceback.format_exc())
        result["rc"] = f"{type(e).__name__}: {e}"
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["output"] = out.getvalue()[-6000:]
    result["new_files"] = sorted(
        str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file() and p not in before
    )
    return result


def prepare(spec: dict, workdir: Path) -> list[str]:
    """The command's arguments with placeholders filled, data pointed at fixtures and (training) shortened."""
    args, kind = spec["args"], spec["kind"]
    if kind == "python-block":
        return args
    if kind == "train.py":
        args = resolve_placeholders(args, workdir, None)
        if "--help" in args:
            return args
        cut = cut_sweep(args) if "-m" in args else args
        cfg = compose_train(cut)
        args = data_fixture(cfg, cut, workdir) + shortening(cfg, cut)
        key = kind_of(cfg, args)
        if key in KINDS_RUN:  # this kind ran: compose and build this command's model and data instead
            raise SameKind(KINDS_RUN[key], args)
        KINDS_RUN[key] = spec["id"]
        return args
    data_args = [a for a in args if a.startswith("data")]
    cfg = compose_train(data_args) if any(a.startswith("data=") for a in data_args) else None
    target = str(cfg.data._target_) if cfg is not None else None
    if cfg is not None:  # the data's own keys shortened (eval's data group has no training transform)
        args = data_fixture(cfg, args, workdir) + [
            a for a in shortening(cfg, data_args) if a.startswith("data.") and "_transform." not in a
        ]
    args = resolve_placeholders(args, workdir, target)
    if kind == "eval.py":
        args.append("++trainer.limit_val_batches=1")
    if kind == "predict.py":
        for arg in args:
            if arg.startswith("input=") and arg.endswith("/"):
                make_photos(workdir / arg[len("input=") :])
        args += ["num_workers=0", "batch_size=2"]
    if kind == "export.py" and "format=torchscript" not in args:
        # torch.export's ONNX exporter takes ~10 s more here; tests/test_tools.py round-trips its files
        args.append("onnx_dynamo=false")
    return args


# --- shortening ------------------------------------------------------------------------------------------------
# Each entry: (config key, what it is set to, why). Applied to a training command's config when the key is there,
# after the command's own overrides; a key the command sets itself keeps the command's value unless FORCED.
SHORTEN = [
    ("++trainer.limit_train_batches", 1, "one training batch an epoch"),
    ("++trainer.limit_val_batches", 1, "one validation batch"),
    ("trainer.max_epochs", 1, "one epoch (two where the command resumes: one step past the run it resumes)"),
    ("validate_best", False, "no second validation of best.ckpt (the last validation's metrics go to metrics.json)"),
    ("callbacks.prediction_images", None, "no prediction pictures (matplotlib drawing costs seconds)"),
    ("callbacks.pr_curves", None, "no precision-recall pictures (same)"),
    ("data.num_train", 4, "4 shapes training images"),
    ("data.num_val", 2, "2 shapes validation images"),
    ("data.batch_size", 2, "2 images a batch (paper batches are sized for GPUs)"),
    ("data.val_batch_size", 2, "2 images a validation batch"),
    ("data.num_workers", 0, "no loader processes"),
    ("data.pin_memory", False, "no pinned memory (no GPU)"),
    ("data.persistent_workers", False, "no loader processes"),
    ("data.train_transform.min_sizes", [64], "RetinaNet's shorter side 64 px instead of 640-800"),
    ("data.train_transform.max_size", 107, "and its longer side ≤ 107 px (the paper's 1333:800)"),
    ("data.val_transform.min_size", 64, "validation likewise"),
    ("data.val_transform.max_size", 107, "validation likewise"),
    ("model.backbone.depth", 18, "ResNet-18 instead of ResNet-50/101 (where deeper)"),
    ("model.backbone.width", 0.125, "ResNet, VGG16 or YOLO's network with an eighth of the channels"),
    ("model.head.hidden", 256, "YOLO's first FC layer 256 wide instead of 4096 (205M weights at 448 px)"),
    ("model.backbone.weights", None, "no ImageNet weights: they are a download"),
    ("trainer.accelerator", "cpu", "the CPU instead of GPUs"),
    ("trainer.devices", 1, "one device instead of 4 or 8 GPUs"),
    ("trainer.num_nodes", 1, "one node"),
    ("trainer.strategy", "auto", "no DDP (one process)"),
    ("hydra.sweeper.n_trials", 1, "1 Optuna trial"),
    ("memory_check", False, "no memory probe (its probe steps cost as much as the run; batches here are 2 images)"),
]
FORCED = {"trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "model.backbone.weights"}
SMALLER_ONLY = {
    "data.num_train",
    "data.num_val",
    "data.batch_size",
    "data.val_batch_size",
    "model.backbone.depth",
    "model.backbone.width",
    "model.head.hidden",
    "trainer.devices",
    "trainer.num_nodes",
}
MAX_SWEEP_JOBS = 2  # a multirun runs its first two jobs (the README's job count is checked on the full sweep)


def cut_sweep(overrides: list[str]) -> list[str]:
    """A sweep's lists cut to MAX_SWEEP_JOBS jobs in all: the first swept key keeps its first values, the others
    their first."""
    out, budget = [], MAX_SWEEP_JOBS
    for arg in overrides:
        values = sweep_values(arg) if "=" in arg and not arg.startswith("-") else None
        if values is None:
            out.append(arg)
            continue
        kept = values[:budget]
        budget = 1
        out.append(f"{arg.partition('=')[0]}={','.join(kept)}")
    return out


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    single = [a for a in overrides if not a.startswith("-")]
    single = [f"{a.partition('=')[0]}={v[0]}" if (v := sweep_values(a)) else a for a in single]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=single, return_hydra_config=True)


def shortening(cfg, overrides: list[str]) -> list[str]:
    """The SHORTEN overrides that apply to this command's composed config ``cfg``."""
    from omegaconf import OmegaConf

    own = {a.lstrip("+").partition("=")[0] for a in overrides}
    extra = []
    for key, value, _ in SHORTEN:
        plain = key.lstrip("+")
        if plain in own and plain not in FORCED:
            continue
        if key.startswith("++"):
            pass
        elif OmegaConf.select(cfg, plain, default="<absent>") == "<absent>":
            continue
        else:
            current = OmegaConf.select(cfg, plain)
            if current == value or (plain in SMALLER_ONLY and isinstance(current, (int, float)) and current <= value):
                continue
            if plain == "trainer.strategy" and "ddp" not in str(current):
                continue
            if plain == "callbacks.prediction_images" and current is None:
                continue
        if plain == "trainer.max_epochs" and any(a.startswith("ckpt_path=") for a in overrides):
            value = 2
        extra.append(f"{key}={json.dumps(value) if value is not None else 'null'}".replace('"', ""))
    return extra


def main(plan_path: str, results_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    workdir = Path(plan["workdir"])
    os.chdir(workdir)
    sys.path.insert(0, str(ROOT))
    os.environ["WANDB_MODE"] = "disabled"
    import torch

    import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})

    # one thread: on 2 shared cores, two threads per op made these tiny runs 3× slower when the other core was busy
    torch.set_num_threads(1)

    results = []
    for spec in plan["commands"]:
        results.append(run_one(spec, workdir))
        partial = Path(f"{results_path}.part")
        partial.write_text(json.dumps(results, indent=1))
        partial.replace(results_path)  # the test reads it meanwhile: never half-written


def make_recipe(target: str) -> list[str]:
    """What `make <target>` runs, as make prints it without running it (`make -n`): its last recipe line."""
    # under `make test` this is a sub-make: without --no-print-directory it adds "Leaving directory" lines
    # ARGS= : the README's command as typed, not with the pytest options of a `make test ARGS=...` around it
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target, "ARGS="],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main(*sys.argv[1:3])
