"""Build the artifacts the CI parity gate checks, for a small model; print their paths, one a line.

Model: the embedded default (paragon_export.defaults.default_checkpoint()) when it exists, else a
seeded nano x2 whose tracked kernels are calibrated on real photos. Artifacts: the fused checkpoint,
ONNX fp32 and fp16, INT8 Q/DQ ONNX, made with the toolkit's own steps (export_onnx, quantize_int8)
where they exist, else with plain exporters (TorchScript export, onnxconverter-common, ORT
quantize_static in the TensorRT recipe)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from paragon_export.images import lr_hr_crops, sample_photo_paths, to_tensor


def log(msg: str) -> None:
    print(f"[ci_parity] {msg}", file=sys.stderr, flush=True)


def source_checkpoint(work: Path) -> Path:
    from paragon_export.errors import ParagonError

    try:
        from paragon_export.defaults import default_checkpoint

        path = Path(default_checkpoint())
        log(f"model: embedded default {path}")
        return path
    except (ImportError, ParagonError) as e:
        log(f"no embedded default model ({e}); using a seeded nano")
    from arch import build, calibrate_kernels
    from paragon_export.checkpoint import save_model

    torch.manual_seed(0)
    model = build("paragonsr2_nano", scale=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LayerScale at 1e-5 would make every block a no-op
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.25 * torch.rand(p.shape, generator=g))
    calibrate_kernels(model, (to_tensor(lr) for _, lr, _ in lr_hr_crops(sample_photo_paths("train")[:8], 2, (48, 48))))
    model.eval()
    path = work / "seeded_nano_x2.safetensors"
    save_model(model, path, variant="paragonsr2_nano", force=True)
    log(f"model: seeded nano x2, kernels calibrated on real photos, at {path}")
    return path


def fused_checkpoint(src: Path, work: Path) -> Path:
    from paragon_export.checkpoint import load_model
    from paragon_export.fuse import fuse

    if load_model(src).fused:
        return src
    art, _ = fuse(src, work / f"{src.stem}_fused.safetensors", force=True)
    return art.path


def onnx_files(fused: Path, work: Path) -> tuple[Path, Path]:
    try:
        from paragon_export.export_onnx import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        arts = export_onnx(fused, work / "onnx", fp16=True, force=True)
        log("ONNX fp32/fp16: paragon_export.export_onnx")
        return arts["fp32"].path, arts["fp16"].path
    import onnx
    from onnxconverter_common import float16

    from paragon_export.checkpoint import load_model

    model = load_model(fused).model
    (work / "onnx").mkdir(exist_ok=True)
    fp32, fp16 = work / "onnx" / "model_fp32.onnx", work / "onnx" / "model_fp16.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(fp32), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "output": {0: "n", 2: "H", 3: "W"}})
    onnx.save(float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    log("ONNX fp32/fp16: plain TorchScript export + onnxconverter-common (export_onnx not available)")
    return fp32, fp16


def int8_file(fp32: Path, work: Path, scale: int) -> Path:
    try:
        from paragon_export.int8 import quantize_int8
    except ImportError:
        quantize_int8 = None
    if quantize_int8 is not None:
        log("INT8: paragon_export.int8.quantize_int8")
        return quantize_int8(fp32, work / "int8", force=True).path
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    crops = lr_hr_crops(sample_photo_paths("train"), scale, (48, 48))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": to_tensor(lr).numpy().astype(np.float32)} for _, lr, _ in crops])

        def get_next(self):
            return next(self.it, None)

    out = work / "int8" / "model_int8_qdq.onnx"
    out.parent.mkdir(exist_ok=True)
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv", "ConvTranspose"])
    log("INT8: ORT quantize_static, symmetric QDQ per-channel (quantize_int8 not available)")
    return out


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    from paragon_export.checkpoint import load_model

    src = source_checkpoint(work)
    scale = load_model(src).scale
    fused = fused_checkpoint(src, work)
    fp32, fp16 = onnx_files(fused, work)
    int8 = int8_file(fp32, work, scale)
    for p in (src, fused, fp32, fp16, int8):
        print(p)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
