"""Export a checkpoint: `python export.py ckpt_path=<file.ckpt> format=onnx|torchscript [input_size=[h,w]]`.

What is in the file: the network, uint8 images (B, 3, H, W) at the fixed input size → the head's raw outputs
(named as `DenseDetector.forward` returns them: `class_scores`, `box_deltas` and YOLO's `objectness`)
and `priors` (N, 4), the prior boxes of that input size (a constant). The batch size is free. Normalisation is
inside; class names, input size, preprocessing and post-processing settings are in the file's metadata (ONNX
metadata_props / TorchScript extra file "detector.json").

What is left outside, in Python (`ExportedDetector` below): the validation transform (resize) and padding to the
input size, and the post-processing: score threshold, per-level/per-class top-k, box decoding, clipping, NMS and the
per-image cap. The post-processing finds its candidates with data-dependent shapes (nonzero, per-image groups
split by their counts), which tracing would freeze to one example's counts; the same Python code as the PyTorch
model's runs on the exported outputs instead, so the detections match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn

import engine.config  # noqa: F401  (registers the config resolvers, e.g. ${len:...})
from datamodules.transforms import Preprocess
from detectors import DenseDetector
from detectors.batch import DetectionBatch, collate_detection
from detectors.priors import Priors
from engine.checkpoint_loading import build_model, load_checkpoint, resolve_preprocessing, training_data_config

log = logging.getLogger("export")
for _name in ("onnx_ir", "onnxscript"):  # their graph passes log every rewrite at INFO, which Hydra's logging shows
    logging.getLogger(_name).setLevel(logging.WARNING)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
METADATA_KEY = "detector"  # the ONNX metadata_props key; TorchScript: extra file "detector.json"
# files exported before the heads' outputs had one set of names for the three papers
RENAMED_OUTPUTS = {
    "cls_logits": "class_scores",
    "box": "box_deltas",
    "confidence": "objectness",
    "class_probs": "class_scores",
}
CHECK_TOLERANCE = 1e-3  # |exported − PyTorch| ≤ tol · (1 + |PyTorch|) on the raw outputs: float32 re-ordering only


class ExportableNetwork(nn.Module):
    """The network's forward (normalise, backbone, head, in its layout) for one input size, its outputs as a tuple
    in name order, plus the priors of that size, computed once here (a buffer: the file holds them as a constant)."""

    def __init__(self, net: DenseDetector, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        with torch.no_grad():  # one pass tells the output names and the feature sizes the priors depend on
            probe = torch.zeros((2, 3, *input_size), dtype=torch.uint8, device=net.pixel_mean.device)
            outputs, priors = net(probe)
        self.output_names = sorted(outputs)
        self.level_sizes = [int(n) for n in priors.level_sizes]
        self.register_buffer("prior_boxes", priors.boxes.detach().float().clone())

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        outputs, _ = self.net(images)
        # the priors as a computed output (not the bare buffer): ONNX graph outputs must be produced by a node
        return (*(outputs[name] for name in self.output_names), self.prior_boxes * 1.0)


def default_input_size(cfg: DictConfig, transform: dict | None, trained: dict | None) -> tuple[int, int]:
    """``input_size`` if given; else the eval transform's fixed size (ResizeTo), else the training images' size
    (the built-in shapes data, used without a resize); else an error asking for it."""
    size = cfg.get("input_size")
    if size is None and transform and "size" in transform:
        size = transform["size"]
    if size is None and not transform and trained and trained.get("image_size"):
        size = trained["image_size"]
    if size is None:
        raise ValueError(
            f"input_size is needed: the eval transform {transform} does not fix one size; give the "
            f"padded network input, e.g. input_size=[800,1344] for RetinaNet's landscape images"
        )
    if isinstance(size, (ListConfig, list, tuple)):
        size = list(size)
    hw = [size, size] if isinstance(size, int) else size
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"input_size={size}: give one positive int (square) or [height, width]")
    return int(hw[0]), int(hw[1])


def round_up(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    return tuple(-(-s // divisor) * divisor for s in size)  # type: ignore[return-value]


def export_onnx(
    network: ExportableNetwork, example: Tensor, path: Path, opset: int, dynamo: bool, metadata: str
) -> None:
    try:
        import onnx
    except ImportError:
        raise ImportError("format=onnx needs the onnx package: pip install onnx onnxscript onnxruntime") from None
    names = [*network.output_names, "priors"]
    if dynamo:
        try:
            import onnxscript  # noqa: F401  (torch.onnx's torch.export-based exporter needs it)
        except ImportError:
            raise ImportError(
                "format=onnx with onnx_dynamo=true needs onnxscript: pip install onnxscript "
                "(or onnx_dynamo=false for the legacy exporter)"
            ) from None
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=names,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter: chosen on purpose here
            torch.onnx.export(
                network,
                (example,),
                str(path),
                dynamo=False,
                input_names=["images"],
                output_names=names,
                opset_version=opset,
                dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in network.output_names}},
            )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save(model, str(path))


def export_torchscript(network: ExportableNetwork, example: Tensor, path: Path, metadata: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still what format= asks
        # shape checks inside torch's own layers (GroupNorm's) become constants: right for the fixed input size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace=False: the check re-runs the trace (doubling the time); export's own check compares outputs
        traced = torch.jit.trace(network, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": metadata})


class ExportedDetector:
    """Runs an exported file like ``DenseDetector.detect``: ``detect(images)`` takes uint8 (3, h, w) images of any
    size and gives per-image ``boxes`` (xyxy, the image's own pixels), ``scores``, ``labels``. The validation
    transform, padding to the input size and the post-processing run in Python from the file's metadata
    (``postprocess`` overrides merge onto its settings, e.g. ``{"score_thresh": 0.3}``). ONNX runs on
    onnxruntime's ``providers`` (default: the CPU; e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``)."""

    def __init__(
        self,
        path: str | Path,
        postprocess: dict[str, Any] | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such exported model")
        if self.path.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ImportError(f"{self.path}: running ONNX needs onnxruntime: pip install onnxruntime") from None
            self.session = onnxruntime.InferenceSession(str(self.path), providers=list(providers))
            meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            self.module = None
        else:
            extra = {f"{METADATA_KEY}.json": ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; the file is one
                self.module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
            meta = extra[f"{METADATA_KEY}.json"]
        if not meta:
            raise ValueError(f"{self.path}: no '{METADATA_KEY}' metadata; export the model with export.py")
        self.meta = json.loads(meta)
        self.class_names: list[str] = self.meta["class_names"]
        self.input_size: tuple[int, int] = tuple(self.meta["input_size"])
        self.preprocess = Preprocess(self.meta["val_transform"], self.meta["size_divisible"])
        self.postprocess = instantiate({**self.meta["postprocess"], **(postprocess or {})})

    def run(self, images: Tensor) -> tuple[dict[str, Tensor], Priors]:
        """uint8 (B, 3, H, W) at the input size → raw outputs by name and the priors (``DenseDetector.forward``'s)."""
        if tuple(images.shape[-2:]) != self.input_size or images.dtype != torch.uint8:
            raise ValueError(
                f"{self.path} takes uint8 images of {list(self.input_size)}; got {images.dtype} "
                f"{list(images.shape[-2:])}"
            )
        if self.module is not None:
            with torch.no_grad():
                values = [v.cpu() for v in self.module(images.cpu())]
        else:
            values = [torch.from_numpy(v) for v in self.session.run(None, {"images": images.cpu().numpy()})]
        names = [RENAMED_OUTPUTS.get(name, name) for name in self.meta["outputs"]]
        outputs = dict(zip(names, values[:-1], strict=True))
        return outputs, Priors(values[-1], list(self.meta["level_sizes"]))

    def batch(self, images: Sequence[Tensor]) -> DetectionBatch:
        """The images transformed as the model's validation did, padded bottom/right to the input size."""
        samples = [self.preprocess(image, i) for i, image in enumerate(images)]
        batch = collate_detection(samples, self.preprocess.size_divisible)
        h, w = batch.input_size
        if h > self.input_size[0] or w > self.input_size[1]:
            raise ValueError(
                f"{self.path}: an image becomes {h}x{w} after {self.preprocess}, larger than the "
                f"exported input {self.input_size[0]}x{self.input_size[1]}; export with a larger "
                f"input_size or a transform that resizes (data/transform=<name>)"
            )
        padded = torch.zeros((len(images), 3, *self.input_size), dtype=torch.uint8)
        padded[:, :, :h, :w] = batch.images
        return dataclasses.replace(batch, images=padded)

    def detect(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        batch = self.batch(images)
        outputs, priors = self.run(batch.images)
        detections = self.postprocess(outputs, priors, batch.image_sizes)
        for i, det in enumerate(detections):
            det["boxes"] = batch.boxes_in_original_frame(det["boxes"], i)
        return detections


def check_export(network: ExportableNetwork, path: Path, input_size: tuple[int, int]) -> float:
    """The largest |exported − PyTorch| of the raw outputs on a random batch of 3; an error beyond tolerance."""
    images = torch.randint(0, 256, (3, 3, *input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(images)
    outputs, priors = ExportedDetector(path).run(images)
    worst = 0.0
    for name, want, got in zip([*network.output_names, "priors"], expected, [*outputs.values(), priors.boxes]):
        excess = ((got - want).abs() - CHECK_TOLERANCE * (1 + want.abs())).max().item()
        worst = max(worst, (got - want).abs().max().item())
        if excess > 0:
            raise RuntimeError(
                f"{path}: output {name!r} differs from PyTorch's by up to "
                f"{(got - want).abs().max().item():.3g} (tolerance {CHECK_TOLERANCE} relative); "
                f"the export is wrong, please report it with the model config"
            )
    return worst


def export(cfg: DictConfig) -> Path:
    ckpt_path = str(cfg.ckpt_path)
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt}: choose one of {', '.join(FORMATS)}")
    checkpoint = load_checkpoint(ckpt_path, trusted=bool(cfg.get("trust_checkpoint")))
    transform, size_divisible, source = resolve_preprocessing(cfg.get("data"), checkpoint, ckpt_path)
    trained, _ = training_data_config(checkpoint, ckpt_path) if not cfg.get("input_size") else (None, "")
    size = default_input_size(cfg, transform, trained)
    input_size = round_up(size, size_divisible)  # the model always sees inputs padded to this multiple
    if input_size != size:
        log.info("input_size %s padded to %s (size_divisible %d)", list(size), list(input_size), size_divisible)
    model = build_model(checkpoint, ckpt_path, cfg.get("model"), trusted=bool(cfg.get("trust_checkpoint")))
    network = ExportableNetwork(model.net, input_size).eval()
    metadata = json.dumps(
        {
            "class_names": list(model.net.class_names),
            "input_size": list(input_size),
            "outputs": network.output_names,
            "level_sizes": network.level_sizes,
            "val_transform": transform,
            "size_divisible": size_divisible,
            "postprocess": model.model_config["postprocess"],
            "checkpoint": str(ckpt_path),
            "format": fmt,
        }
    )
    path = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / f"model{FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((2, 3, *input_size), dtype=torch.uint8)  # batch 2: torch.export specialises a batch of 1
    log.info(
        "exporting %s (input %s, transform %s from %s) to %s",
        Path(ckpt_path).name,
        list(input_size),
        transform,
        source,
        path,
    )
    if fmt == "onnx":
        export_onnx(network, example, path, int(cfg.opset), bool(cfg.onnx_dynamo), metadata)
    else:
        export_torchscript(network, example, path, metadata)
    if cfg.get("check", True):
        worst = check_export(network, path, input_size)
        log.info("checked: the exported outputs are within %.2g of PyTorch's on a random batch", worst)
    print(
        f"\nexported {fmt} to {path} (input uint8 [batch, 3, {input_size[0]}, {input_size[1]}]; outputs "
        f"{', '.join([*network.output_names, 'priors'])}); run it with export.ExportedDetector('{path}').detect"
    )
    return path


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
