"""train.py's checkpoints for the tools (eval.py, predict.py, export.py) and for fine-tuning.

* ``load_checkpoint``: on the CPU whatever device saved it, with ``torch.load(weights_only=True)`` (a Lightning
  checkpoint of ours holds only tensors and plain containers); a file holding anything else is refused with the
  type it holds, unless the user trusts it (``trust_checkpoint=true``).
* ``build_model``: the ``DetectionModule`` rebuilt from the checkpoint's ``model_config`` (inference settings such
  as ``postprocess.score_thresh`` may be overridden) with its weights; the tools use its network, ``.net``.
* ``training_data_config`` / ``resolve_preprocessing``: the data settings the checkpoint was trained with, so the
  tools feed the model images transformed as its validation did (``val_transform``, ``size_divisible``).
* ``check_classes``: a clear error when a checkpoint's classes are not the data's; ``finetune_from``: load a
  checkpoint into a model of other classes, re-initialising only the class-dependent head layers.
(An image made into the network's input as the checkpoint's validation did: ``datamodules.transforms.Preprocess``.)
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from engine.detection_module import NET_PREFIX, DetectionModule, with_net_prefix

log = logging.getLogger(__name__)

TRANSFORM_CHOICES = "retinanet|ssd|ssd512|yolo|none"  # conf/data/transform/; none (like flip): no resize


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file, what is wrong and the fix."""


class ClassMismatchError(CheckpointError):
    """A checkpoint trained on other classes than the data's."""


# --- loading --------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, trusted: bool = False, bare_state_dict: bool = False) -> dict[str, Any]:
    """The checkpoint's dict, tensors on the CPU (a GPU-saved file loads on a machine without one); with
    ``bare_state_dict``, a file holding only tensors by name (torchvision's weights files) is accepted too.

    ``weights_only=True`` first: it unpickles only tensors and plain containers, so a file cannot run code when
    loaded. A file that holds other objects (an older or foreign checkpoint) is refused naming the type, unless
    ``trusted``, where it is loaded with full pickle and the reason logged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={path}: no such file; give a checkpoint written by train.py, e.g. "
            f"runs/<task>/<date>_<time>/checkpoints/best.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a `{found.group(1)}` object" if found else "an object weights_only loading refuses"
        if not trusted:
            raise CheckpointError(
                f"ckpt_path={path}: the file holds {what}, so it cannot be loaded with torch.load(weights_only=True) "
                f"(safe: tensors and plain containers only). If you trust the file, add trust_checkpoint=true (full "
                f"pickle, which can run code), or allow that type with torch.serialization.add_safe_globals"
                f"([{found.group(1) if found else '<type>'}])"
            ) from None
        log.warning(
            "%s holds %s: loaded with full pickle (weights_only=False) because trust_checkpoint=true", path, what
        )
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except RuntimeError as e:  # not a zip/pickle file, truncated copy
        raise CheckpointError(f"ckpt_path={path}: not a readable PyTorch checkpoint ({e})") from None
    bare = isinstance(checkpoint, dict) and all(isinstance(v, Tensor) for v in checkpoint.values())
    if not isinstance(checkpoint, dict) or ("state_dict" not in checkpoint and not (bare_state_dict and bare)):
        raise CheckpointError(
            f"ckpt_path={path}: no 'state_dict' in the file; give a Lightning checkpoint written "
            f"by train.py (checkpoints/best.ckpt or last.ckpt)"
        )
    return checkpoint


# parts that moved since checkpoints were first written: old checkpoints still build
MOVED_TARGETS = {
    "detectors.Detector": "engine.detection_module.DetectionModule.from_config_keys",
    # the module itself: its config may hold CONFIG_ONLY_KEYS (num_prediction_layers), which it no longer takes
    "engine.detection_module.DetectionModule": "engine.detection_module.DetectionModule.from_config_keys",
    "detectors.assigners.MaxIoUAssigner": "detectors.retinanet.MaxIoUAssigner",
    "detectors.losses.RetinaNetLoss": "detectors.retinanet.RetinaNetLoss",
    "detectors.postprocess.DensePostprocess": "detectors.retinanet.RetinaNetPostprocess",
    "detectors.assigners.BestMatchIoUAssigner": "detectors.ssd.BestMatchIoUAssigner",
}


def current_targets(config: Any) -> Any:
    """``config`` with every ``_target_`` that names a moved part (``MOVED_TARGETS``) renamed to where it lives."""
    if isinstance(config, Mapping):
        return {k: MOVED_TARGETS.get(v, v) if k == "_target_" else current_targets(v) for k, v in config.items()}
    if isinstance(config, list):
        return [current_targets(v) for v in config]
    return config


def model_config_of(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    config = checkpoint.get("model_config")
    if not config:
        raise CheckpointError(
            f"ckpt_path={path}: the checkpoint holds no 'model_config' (the resolved Hydra model "
            f"config train.py saves), so the model cannot be rebuilt; use a checkpoint of train.py"
        )
    return current_targets(copy.deepcopy(dict(config)))


def apply_overrides(
    config: dict[str, Any], overrides: Mapping[str, Any] | DictConfig | None, key: str = "model"
) -> dict[str, Any]:
    """``overrides`` merged onto ``config``; ``None`` leaves keep the config's value (the tools' yaml lists the
    inference settings as null). A key the config does not have is an error naming it: a typo would else be
    silently ignored or fail deep inside the model's constructor."""
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    out = copy.deepcopy(config)
    for name, value in (overrides or {}).items():
        where = f"{key}.{name}"
        if value is None:
            continue
        if name not in out:
            raise CheckpointError(
                f"{where}={value!r}: the checkpoint's model config has no such key (it has: "
                f"{', '.join(sorted(map(str, out)))})"
            )
        if isinstance(value, Mapping) and isinstance(out[name], Mapping):
            out[name] = apply_overrides(dict(out[name]), value, where)
        else:
            out[name] = value
    return out


# a checkpoint's config is instantiated: its _target_s may only name this project's parts and the libraries' own
SAFE_TARGET_PREFIXES = ("detectors.", "datamodules.", "engine.detection_module.", "torch.", "torchvision.")


def check_targets(config: Any, path: str | Path, trusted: bool = False, where: str = "model_config") -> None:
    """Refuses a ``_target_`` outside SAFE_TARGET_PREFIXES anywhere in ``config`` unless ``trusted``: weights_only
    loading keeps pickle from running code, and this keeps a crafted config from doing it through Hydra."""
    if isinstance(config, Mapping):
        target = config.get("_target_")
        if isinstance(target, str) and not target.startswith(SAFE_TARGET_PREFIXES) and not trusted:
            raise CheckpointError(
                f"ckpt_path={path}: {where}._target_ is {target!r}, outside this project's "
                f"packages and torch/torchvision; if you trust the file, add trust_checkpoint=true"
            )
        for key, value in config.items():
            check_targets(value, path, trusted, f"{where}.{key}")
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_targets(value, path, trusted, f"{where}.{i}")


def build_model(
    checkpoint: Mapping[str, Any],
    path: str | Path,
    overrides: Mapping[str, Any] | DictConfig | None = None,
    trusted: bool = False,
) -> DetectionModule:
    """The checkpoint's ``DetectionModule``, in eval mode on the CPU, with ``overrides`` applied to its model config
    (``{"postprocess": {"score_thresh": 0.01}}``); ``module.model_config`` is the config used, ``module.net`` the
    network. The backbone's pretrained weights are not fetched: the checkpoint's replace them."""
    config = apply_overrides(model_config_of(checkpoint, path), overrides)
    check_targets(config, path, trusted)
    module = DetectionModule.from_config(config, pretrained=False)
    module.data_config = checkpoint.get("data_config")
    try:
        module.load_state_dict(with_net_prefix(checkpoint["state_dict"]))
    except RuntimeError as e:
        raise CheckpointError(
            f"ckpt_path={path}: its weights do not fit the model its config builds "
            f"(overrides: {dict(overrides or {})}): {e}"
        ) from None
    return module.eval()


# --- the classes --------------------------------------------------------------------------------------------
def check_classes(checkpoint_classes: Sequence[str], data_classes: Sequence[str], path: str | Path) -> None:
    """A clear error when the checkpoint's class list is not the data's (names and order: labels are positions)."""
    ours, theirs = list(checkpoint_classes), list(data_classes)
    if ours == theirs:
        return
    only_ckpt = [c for c in ours if c not in theirs]
    only_data = [c for c in theirs if c not in ours]
    detail = (
        f"only in the checkpoint: {only_ckpt}; only in the data: {only_data}"
        if only_ckpt or only_data
        else "the same names in another order (labels are positions in the list)"
    )
    raise ClassMismatchError(
        f"ckpt_path={path} was trained on {len(ours)} classes {ours}, but the data has {len(theirs)} classes "
        f"{theirs} (data.classes): {detail}. Evaluate on data with the checkpoint's classes (data.classes=[...] in "
        f"that order), or fine-tune it on these classes: python train.py ... model.finetune_from={path}"
    )


def class_dependent_keys(module: DetectionModule) -> set[str]:
    """The module's state-dict keys whose shape depends on the number of classes (the classifier layers; YOLO's
    last layer, which mixes boxes and classes): its head built again from ``module.model_config`` with one
    class more, compared tensor by tensor. Shapes against the old checkpoint would miss a list of other names
    of the same length."""
    config = (module.model_config or {}).get("head")
    if not isinstance(config, Mapping) or "num_classes" not in config:
        raise CheckpointError(
            "fine-tuning needs the module's model_config with head.num_classes: build it with "
            "DetectionModule.from_config(<the resolved model config>)"
        )
    net = module.net
    with torch.random.fork_rng():  # the probe's initialisation must not shift the training run's random stream
        probe = instantiate({**config, "num_classes": int(config["num_classes"]) + 1})
        if not isinstance(probe, nn.Module):  # a factory, completed as DenseDetector.__init__ does
            probe = probe(in_channels=net.backbone.out_channels, num_anchors=net.priors.num_anchors_per_location)
    theirs = probe.state_dict()
    return {
        f"{NET_PREFIX}head.{k}"
        for k, v in net.head.state_dict().items()
        if k not in theirs or theirs[k].shape != v.shape
    }


TORCHVISION = "torchvision"  # model.finetune_from=torchvision: torchvision's COCO weights of this architecture


def torchvision_coco_weights(net: nn.Module) -> tuple[Any, Any, list[str]]:
    """(torchvision's COCO weights enum, the map of its state dict onto ours, its class list in our label order) for
    the network's architecture: RetinaNet (``model=retinanet_torchvision``) or SSD300 (``model=ssd_torchvision``)."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights, SSD300_VGG16_Weights

    from detectors.retinanet import RetinaNetHead, torchvision_retinanet_state_dict
    from detectors.ssd import SSDHead, torchvision_ssd_state_dict

    if isinstance(net.head, RetinaNetHead):
        weights = RetinaNet_ResNet50_FPN_Weights.COCO_V1
        return weights, torchvision_retinanet_state_dict, list(weights.meta["categories"])  # its 91 label slots
    if isinstance(net.head, SSDHead):
        weights = SSD300_VGG16_Weights.COCO_V1
        return weights, torchvision_ssd_state_dict, list(weights.meta["categories"])[1:]  # ours: no background
    raise CheckpointError(
        f"model.finetune_from={TORCHVISION}: torchvision has COCO weights for RetinaNet (model=retinanet_torchvision) "
        f"and SSD300 (model=ssd_torchvision), not for a {type(net.head).__name__}"
    )


def torchvision_state(net: nn.Module, tv_state: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """The weights of torchvision's COCO-trained model of this architecture, mapped onto ours (state-dict keys of the
    module), and its classes: ``tv_state`` (that state dict, read from the file torchvision downloads), or with None
    downloaded by torchvision's weights API (kept in torch's hub cache)."""
    weights, to_ours, classes = torchvision_coco_weights(net)
    if tv_state is None:
        try:
            tv_state = weights.get_state_dict(progress=True)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), a truncated download
            target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise CheckpointError(
                f"model.finetune_from={TORCHVISION}: could not fetch torchvision's weights {weights.url} ({e}). "
                f"Without internet here, download that file elsewhere and put it at {target} (torchvision's cache), "
                f"or give it: model.finetune_from=<the .pth file>"
            ) from None
    own = with_net_prefix(net.state_dict())
    # BatchNorm's update counters, where our backbone freezes BN (the COCO weights' own FrozenBatchNorm has none)
    state = {k: v for k, v in with_net_prefix(to_ours(tv_state)).items() if k in own or "num_batches_tracked" not in k}
    return state, classes


def finetune_from(model: DetectionModule, path: str | Path, trusted: bool = False) -> dict[str, list[str]]:
    """Load the weights of ``path`` into ``model`` (``model.finetune_from=<...>``): a checkpoint of train.py,
    ``torchvision`` (torchvision's COCO weights of this architecture, downloaded) or a file of those weights (a
    torchvision state dict, as it downloads them). Same classes: every weight. Other classes: every weight but the
    class-dependent head layers, which keep the model's fresh initialisation (RetinaNet's prior-probability bias
    included). Returns the keys ``loaded`` and ``reinitialised``; any other difference between the two models is an
    error naming the keys."""
    new = list(model.net.class_names)
    checkpoint = None if str(path) == TORCHVISION else load_checkpoint(path, trusted, bare_state_dict=True)
    if checkpoint is None or "state_dict" not in checkpoint:  # torchvision's weights, downloaded or from their file
        state, old = torchvision_state(model.net, checkpoint)
    else:
        state = with_net_prefix(checkpoint["state_dict"])
        old = checkpoint.get("class_names")
    if old is None:
        raise CheckpointError(
            f"model.finetune_from={path}: the checkpoint holds no 'class_names', so it is unknown "
            f"which head layers fit these classes; use a checkpoint of train.py"
        )
    skip = set() if list(old) == new else class_dependent_keys(model)
    own = model.state_dict()
    different = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and k not in skip and state[k].shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and k not in skip]
    unexpected = [k for k in state if k not in own]
    if different or missing or unexpected:
        raise CheckpointError(
            f"model.finetune_from={path}: the checkpoint's model differs from this one beyond the "
            f"classes (shapes: {different[:5]}, missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); build the same architecture (model=..., its settings) as it had"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=not skip)
    report = {"loaded": sorted(k for k in state if k not in skip), "reinitialised": sorted(skip)}
    if skip:
        log.info(
            "fine-tuning from %s: its %d classes %s → these %d %s; loaded %d tensors, re-initialised %s",
            path,
            len(old),
            list(old),
            len(new),
            new,
            len(report["loaded"]),
            report["reinitialised"],
        )
    else:
        log.info("fine-tuning from %s: same classes, all %d tensors loaded", path, len(report["loaded"]))
    return report


# --- the data settings the model was trained with -----------------------------------------------------------
def training_data_config(checkpoint: Mapping[str, Any], path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """The resolved ``data`` config of the run that wrote the checkpoint, and where it was found: the checkpoint's
    ``data_config`` (when train.py stores it), else the run folder's ``.hydra/config.yaml``
    (``<run>/checkpoints/<name>.ckpt``); (None, "") when neither exists (a checkpoint copied elsewhere)."""
    stored = checkpoint.get("data_config")
    if stored:
        return copy.deepcopy(dict(stored)), f"{path} (data_config)"
    run_config = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not run_config.is_file():
        return None, ""
    full = OmegaConf.load(run_config)
    if "data" not in full:
        return None, ""
    try:  # resolved inside the whole training config: the data may refer to model.* (the canvas mean)
        return OmegaConf.to_container(full.data, resolve=True), str(run_config)
    except Exception as e:  # noqa: BLE001  (any interpolation error: name the file, then the way out)
        raise CheckpointError(
            f"{run_config}: its data config does not resolve ({e}); give the data and transform "
            f"on the command line (data=<shapes|voc|coco>, data/transform=<name>)"
        ) from None


def resolve_preprocessing(
    data: Mapping[str, Any] | DictConfig | None, checkpoint: Mapping[str, Any], path: str | Path
) -> tuple[dict[str, Any] | None, int, str]:
    """(``val_transform`` config or None, ``size_divisible``, where they came from) for feeding the checkpoint's
    model: the command line's when it names one (``data/transform=<name>`` or ``+data.val_transform=...``),
    else the training run's; neither is an error, as guessing a resize would silently change every box.
    ``size_divisible``: the command line's if given, else that of the transform's source (1 for the command line's)."""
    given = data.get("size_divisible") if data is not None else None
    if data is not None and "val_transform" in data:
        node = data["val_transform"]
        transform = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        return copy.deepcopy(transform), int(given or 1), "the command line"
    trained, where = training_data_config(checkpoint, path)
    if trained is None:
        run_config = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
        raise CheckpointError(
            f"ckpt_path={path}: cannot tell how the model's images were transformed for validation: the checkpoint "
            f"holds no data_config and {run_config} does not exist. Name the transform the model was trained with: "
            f"data/transform=<{TRANSFORM_CHOICES}> (conf/data/transform/; none: images at their own size)"
        )
    # instantiated below: the same _target_ rule as the model's (a transform of elsewhere: data/transform=...)
    check_targets(trained.get("val_transform"), path, where="data_config.val_transform")
    return trained.get("val_transform"), int(given or trained.get("size_divisible", 1) or 1), where
