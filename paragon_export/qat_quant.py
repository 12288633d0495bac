"""ModelOpt fake quantization for the fused ParagonSR2 graph (used by `qat`; imports ModelOpt lazily).

Placement, the `int8` command's TensorRT recipe: every Conv gets an int8 input quantizer (per
tensor) and an int8 weight quantizer (per output channel), symmetric with zero point 0 (narrow_range
off: [-128, 127], as ORT's symmetric QDQ); biases, LeakyReLU, residual Adds and the output stay float.

The fixed Magic-Conv filters are functional convs on buffers, so ModelOpt does not see them; the
`QuantMagicUpsampler` registered here gives them quantizers (input per tensor before each of the
ConvTranspose and the two separable Convs; weights per output channel, which for the depthwise
ConvTranspose is a single scale).
`magic="float"` disables those quantizers (the filters run in float, as TensorRT runs layers
without Q/DQ); `magic="int8"` enables them. See `paragon_export.qat` for which is the default.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.nn.functional as F

from .errors import ParagonError

MAGIC_MODES = ("float", "int8")
_REGISTERED = False


def modelopt():
    """`modelopt.torch.quantization`, imported on first use (it is slow to import and optional for
    every other command)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ParagonError(f"qat needs NVIDIA ModelOpt (pip install nvidia-modelopt requests huggingface_hub): {e}") from None
    _register_magic(mtq)
    return mtq


def _register_magic(mtq) -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from modelopt.torch.quantization.nn import TensorQuantizer

    from paragon_export.arch.magic import MagicUpsampler

    class QuantMagicUpsampler(MagicUpsampler):
        """MagicUpsampler with a quantizer on the input and the weight of each fixed-filter conv.
        The arithmetic is MagicUpsampler.forward's, op for op (tests check disabled == original)."""

        def _setup(self):
            for name in ("resample", "sharpen_h", "sharpen_v"):
                setattr(self, f"{name}_input_quantizer", TensorQuantizer())
                setattr(self, f"{name}_weight_quantizer", TensorQuantizer())

        def _q(self, name: str, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (getattr(self, f"{name}_input_quantizer")(x),
                    getattr(self, f"{name}_weight_quantizer")(w.to(x.dtype)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s, c = self.scale, x.shape[1]
            wh, wv = self.sharpen.conv_h.weight, self.sharpen.conv_v.weight
            if self.taps == "legacy":
                x = F.conv2d(*self._q("sharpen_h", x, wh), padding=(0, wh.shape[-1] // 2), groups=c)
                x = F.conv2d(*self._q("sharpen_v", x, wv), padding=(wv.shape[-2] // 2, 0), groups=c)
                w = self.resample_conv.transpose_kernel(s, box=True)
                return F.conv_transpose2d(*self._q("resample", x, w), stride=s, padding=(w.shape[-1] - s) // 2,
                                          groups=c)
            w = self.resample_conv.transpose_kernel(s, box=False)
            x = F.pad(x, (1, 1, 1, 1), mode="replicate")
            x = F.conv_transpose2d(*self._q("resample", x, w), stride=s, padding=s, groups=c)
            x = x[:, :, s:-s, s:-s]
            r = wh.shape[-1] // 2
            x = F.pad(x, (r, r, r, r), mode="replicate")
            x = F.conv2d(*self._q("sharpen_h", x, wh), groups=c)
            return F.conv2d(*self._q("sharpen_v", x, wv), groups=c)

    if MagicUpsampler not in mtq.QuantModuleRegistry:
        mtq.register(original_cls=MagicUpsampler, quantized_cls=QuantMagicUpsampler)
    _REGISTERED = True


def quant_config(magic: str = "float") -> dict:
    if magic not in MAGIC_MODES:
        raise ParagonError(f"magic must be one of {', '.join(MAGIC_MODES)}, got {magic!r}")
    int8_per_tensor = {"num_bits": 8, "axis": None}
    cfg = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": int8_per_tensor},
        {"quantizer_name": "*", "parent_class": "nn.LeakyReLU", "enable": False},
    ]
    if magic == "int8":
        # Conv weights per channel like every other conv (axis 0); the depthwise ConvTranspose's
        # output-channel axis (1) has length 1, so per channel there is one scale: per tensor.
        cfg.append({"quantizer_name": "*magic_upsampler.resample_weight_quantizer", "cfg": int8_per_tensor})
    else:
        cfg.append({"quantizer_name": "*magic_upsampler.*", "enable": False})
    return {"quant_cfg": cfg, "algorithm": "max"}


def quantize(model: torch.nn.Module, forward_loop, *, magic: str = "float") -> torch.nn.Module:
    """Insert fake quantizers into `model` in place and calibrate them (max) with `forward_loop`."""
    mtq = modelopt()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq.quantize(model, quant_config(magic), forward_loop)
    return model


def quantizers(model: torch.nn.Module) -> dict[str, object]:
    """Enabled quantizers by name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


# Which Magic quantizers cover each ONNX node of the TorchScript export (forward order: the sharpen
# Conv on rows comes before the one on columns in both tap sets).
_MAGIC_NODES = {"ConvTranspose": "resample", "Conv": "sharpen_h", "Conv_1": "sharpen_v"}


def module_for_onnx_node(node_name: str) -> tuple[str, str]:
    """'/body/body.0/blocks/blocks.1/context/dwconv_hw/Conv' -> ('body.0.blocks.1.context.dwconv_hw', 'Conv'):
    the TorchScript exporter names nodes by module scope, a container's children as 'name.index'."""
    *scopes, op = node_name.strip("/").split("/")
    path: list[str] = []
    for c in scopes:
        if path and c.startswith(path[-1] + "."):
            path[-1] = c
        else:
            path.append(c)
    return ".".join(path), op


def quantizers_for_nodes(model: torch.nn.Module, node_names) -> tuple[list[str], list[str]]:
    """Quantizer names (input and weight) of the convs behind ONNX `node_names` of `model`'s export,
    and the node names that match none."""
    found, unmatched = [], []
    modules = dict(model.named_modules())
    for name in node_names:
        mod, op = module_for_onnx_node(name)
        if mod.endswith("magic_upsampler") and op in _MAGIC_NODES and mod in modules:
            prefix = f"{mod}.{_MAGIC_NODES[op]}_"
        elif mod in modules and isinstance(modules[mod], torch.nn.Conv2d) and op == "Conv":
            prefix = f"{mod}."
        else:
            unmatched.append(name)
            continue
        found += [f"{prefix}input_quantizer", f"{prefix}weight_quantizer"]
    return found, unmatched
