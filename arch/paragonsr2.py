"""ParagonSR2 generator (dynamic-transformer release), compatible with traiNNer-redux state dicts.

Training form: blocks with LayerScale and a dynamic depthwise kernel predicted per sample, whose
batch mean is tracked as an EMA. Deploy form (`fuse_for_release`): the tracked kernel becomes a
plain depthwise conv, the generators are dropped and every LayerScale is folded into a conv, so
the exported graph holds only Conv/ConvTranspose/LeakyReLU/Add/Split/Concat (+Pad for mks2021).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .magic import MagicUpsampler

UPSAMPLERS = ("mks2021", "legacy", "pixelshuffle")

# Plain data: the variant table of SPEC §2.
VARIANTS: dict[str, dict] = {
    "paragonsr2_nano": dict(num_feat=24, num_groups=2, num_blocks=2, ffn_expansion=1.5, band_kernel_size=9),
    "paragonsr2_anime": dict(num_feat=28, num_groups=2, num_blocks=3, ffn_expansion=1.5, band_kernel_size=15),
    "paragonsr2_tiny": dict(num_feat=32, num_groups=3, num_blocks=2, ffn_expansion=2.0, band_kernel_size=11),
    "paragonsr2_s": dict(num_feat=56, num_groups=5, num_blocks=5, ffn_expansion=2.0, band_kernel_size=11),
    "paragonsr2_m": dict(num_feat=96, num_groups=8, num_blocks=8, ffn_expansion=2.0, band_kernel_size=11),
    "paragonsr2_l": dict(num_feat=128, num_groups=10, num_blocks=10, ffn_expansion=2.0, band_kernel_size=11),
    "paragonsr2_xl": dict(num_feat=160, num_groups=12, num_blocks=12, ffn_expansion=2.0, band_kernel_size=11),
}

KERNEL_MOMENTUM = 0.05


def _branch_channels(channels: int) -> int:
    return int(channels * 0.125)


class InceptionDWConv(nn.Module):
    """Depthwise context: channels split [identity, 3x3, 1xbk, bkx1]."""

    def __init__(self, *, channels: int, band_kernel_size: int) -> None:
        super().__init__()
        gc = _branch_channels(channels)
        bk = band_kernel_size
        self.split_sizes = [channels - 3 * gc, gc, gc, gc]
        self.dwconv_hw = nn.Conv2d(gc, gc, 3, padding=1, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, bk), padding=(0, bk // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (bk, 1), padding=(bk // 2, 0), groups=gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class FusedInceptionDWConv(nn.Module):
    """`x + ls1(context(x))` as three depthwise convs: the identity channels join the 3x3 branch
    (centre tap 1+gamma), and the residual is folded into every centre tap."""

    def __init__(self, *, channels: int, band_kernel_size: int) -> None:
        super().__init__()
        gc = _branch_channels(channels)
        bk = band_kernel_size
        n = channels - 2 * gc
        self.split_sizes = [n, gc, gc]
        self.dwconv_hw = nn.Conv2d(n, n, 3, padding=1, groups=n)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, bk), padding=(0, bk // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (bk, 1), padding=(bk // 2, 0), groups=gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hw, x_w, x_h = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)

    @torch.no_grad()
    def load_from(self, ctx: InceptionDWConv, gamma: torch.Tensor) -> None:
        n_id, gc = ctx.split_sizes[0], ctx.split_sizes[1]
        g_id, g_hw, g_w, g_h = torch.split(gamma, ctx.split_sizes)
        w = torch.zeros_like(self.dwconv_hw.weight)
        b = torch.zeros_like(self.dwconv_hw.bias)
        w[:n_id, 0, 1, 1] = 1 + g_id
        w[n_id:] = ctx.dwconv_hw.weight * g_hw.view(-1, 1, 1, 1)
        w[n_id:, 0, 1, 1] += 1
        b[n_id:] = ctx.dwconv_hw.bias * g_hw
        self.dwconv_hw.weight.copy_(w)
        self.dwconv_hw.bias.copy_(b)
        for dst, src, g in ((self.dwconv_w, ctx.dwconv_w, g_w), (self.dwconv_h, ctx.dwconv_h, g_h)):
            w = src.weight * g.view(-1, 1, 1, 1)
            kh, kw = w.shape[-2:]
            w[:, 0, kh // 2, kw // 2] += 1
            dst.weight.copy_(w)
            dst.bias.copy_(src.bias * g)
        assert gc == self.split_sizes[1]


class LayerScale(nn.Module):
    def __init__(self, *, channels: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A broadcast multiply: permuting to NHWC (as the original did) breaks channels_last
        # and leaves Transpose nodes in ONNX.
        return x * self.gamma.view(1, -1, 1, 1)


class KernelGenerator(nn.Module):
    def __init__(self, *, hidden: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.predictor = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden * kernel_size * kernel_size, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        return self.predictor(x).reshape(x.shape[0], x.shape[1], k, k)


class DynamicTransformer(nn.Module):
    """1x1 expand -> depthwise 3x3 (per-sample kernels in training, tracked kernel at eval)
    -> LeakyReLU(0.1) -> 1x1 project."""

    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(channels, hidden, 1)
        self.kernel_generator = KernelGenerator(hidden=hidden)
        self.act = nn.LeakyReLU(0.1)
        self.project_out = nn.Conv2d(hidden, channels, 1)
        identity = torch.zeros(hidden, 1, 3, 3)
        identity[:, 0, 1, 1] = 1.0
        self.register_buffer("identity_kernel", identity)
        self.register_buffer("tracked_kernel", torch.zeros_like(identity))
        self.register_buffer("tracked_initialized", torch.tensor(False))
        self.dynamic_inference = False
        self.track_kernels = True
        # Set by kernel calibration: running sum of batch-mean kernels and their count.
        self._calib: tuple[torch.Tensor, int] | None = None

    @property
    def initialized(self) -> bool:
        return bool(self.tracked_initialized)

    def static_kernel(self) -> torch.Tensor:
        return self.tracked_kernel if self.initialized else self.identity_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        n, c, h, w = x.shape
        if self.training or self.dynamic_inference:
            kernels = self.kernel_generator(x)
            y = F.conv2d(x.reshape(1, n * c, h, w), kernels.reshape(n * c, 1, 3, 3), padding=1, groups=n * c)
            y = y.reshape(n, c, h, w)
            if self.training and self.track_kernels:
                self._update_tracked(kernels.detach())
            if self._calib is not None:
                total, count = self._calib
                self._calib = (total + kernels.detach().sum(0).unsqueeze(1).double(), count + n)
        else:
            y = F.conv2d(x, self.static_kernel().to(x.dtype), padding=1, groups=c)
        return self.project_out(self.act(y))

    @torch.no_grad()
    def _update_tracked(self, kernels: torch.Tensor) -> None:
        mean = kernels.mean(0).unsqueeze(1).to(self.tracked_kernel.dtype)
        if not self.initialized:
            self.tracked_kernel.copy_(mean)
            self.tracked_initialized.fill_(True)
        else:
            self.tracked_kernel.lerp_(mean, KERNEL_MOMENTUM)


class FusedTransformer(nn.Module):
    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(channels, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.act = nn.LeakyReLU(0.1)
        self.project_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.act(self.dwconv(self.project_in(x))))

    @torch.no_grad()
    def load_from(self, t: DynamicTransformer, gamma: torch.Tensor) -> None:
        self.project_in.load_state_dict(t.project_in.state_dict())
        self.dwconv.weight.copy_(t.static_kernel())
        self.project_out.weight.copy_(t.project_out.weight * gamma.view(-1, 1, 1, 1))
        self.project_out.bias.copy_(t.project_out.bias * gamma)


class ParagonBlock(nn.Module):
    def __init__(self, *, channels: int, hidden: int, band_kernel_size: int) -> None:
        super().__init__()
        self.context = InceptionDWConv(channels=channels, band_kernel_size=band_kernel_size)
        self.ls1 = LayerScale(channels=channels)
        self.transformer = DynamicTransformer(channels=channels, hidden=hidden)
        self.ls2 = LayerScale(channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.context(x))
        return x + self.ls2(self.transformer(x))


class FusedParagonBlock(nn.Module):
    def __init__(self, *, channels: int, hidden: int, band_kernel_size: int) -> None:
        super().__init__()
        self.context = FusedInceptionDWConv(channels=channels, band_kernel_size=band_kernel_size)
        self.transformer = FusedTransformer(channels=channels, hidden=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.context(x)
        return x + self.transformer(x)


class ResidualGroup(nn.Module):
    def __init__(self, *, num_blocks: int, block: type, **block_args) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[block(**block_args) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) + x


class ParagonSR2(nn.Module):
    def __init__(
        self,
        *,
        scale: int,
        in_chans: int = 3,
        num_feat: int,
        num_groups: int,
        num_blocks: int,
        ffn_expansion: float,
        band_kernel_size: int = 11,
        upsampler: str = "mks2021",
        fused: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= scale <= 4:
            raise ValueError(f"scale must be 1-4, got {scale}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        self.hparams = dict(
            scale=scale, in_chans=in_chans, num_feat=num_feat, num_groups=num_groups, num_blocks=num_blocks,
            ffn_expansion=ffn_expansion, band_kernel_size=band_kernel_size, upsampler=upsampler, fused=fused,
        )
        self.scale = scale
        c = num_feat
        block = FusedParagonBlock if fused else ParagonBlock
        self.conv_in = nn.Conv2d(in_chans, c, 3, padding=1)
        self.body = nn.Sequential(*[
            ResidualGroup(num_blocks=num_blocks, block=block, channels=c, hidden=int(c * ffn_expansion),
                          band_kernel_size=band_kernel_size)
            for _ in range(num_groups)
        ])
        self.conv_fuse = nn.Conv2d(c, c, 3, padding=1)
        if upsampler == "pixelshuffle":
            self.magic_upsampler = None
            self.upsampler = nn.Conv2d(c, c * scale * scale, 3, padding=1)
        else:
            self.magic_upsampler = MagicUpsampler(channels=c, scale=scale, taps=upsampler)
            self.upsampler = nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, in_chans, 3, padding=1)

    @property
    def fused(self) -> bool:
        return self.hparams["fused"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.conv_in(x)
        x = self.conv_fuse(self.body(shallow)) + shallow
        if self.magic_upsampler is None:
            x = F.pixel_shuffle(self.upsampler(x), self.scale)
        else:
            x = self.upsampler(self.magic_upsampler(x))
        return self.conv_out(x)

    def transformers(self) -> Iterable[tuple[str, DynamicTransformer]]:
        return ((n, m) for n, m in self.named_modules() if isinstance(m, DynamicTransformer))

    def set_dynamic_inference(self, enabled: bool) -> None:
        """Use per-sample generated kernels in eval mode too (to measure the dynamic->static gap)."""
        for _, t in self.transformers():
            t.dynamic_inference = enabled

    def uninitialized_kernels(self) -> list[str]:
        return [n for n, t in self.transformers() if not t.initialized]

    @torch.no_grad()
    def fuse_for_release(self) -> "ParagonSR2":
        """Return the deploy form: static kernels, no generators, LayerScale folded into convs."""
        if self.fused:
            raise ValueError("model is already fused")
        missing = self.uninitialized_kernels()
        if missing:
            raise ValueError(
                f"{len(missing)} tracked kernel(s) were never initialised (e.g. {missing[0]}); "
                "fusing would bake identity kernels: calibrate the kernels on real images first"
            )
        fused = ParagonSR2(**{**self.hparams, "fused": True}).to(self.conv_in.weight.device)
        src = {k: v for k, v in self.state_dict().items() if not k.startswith("body.")}
        fused.load_state_dict(src, strict=False)
        for g_src, g_dst in zip(self.body, fused.body):
            for b_src, b_dst in zip(g_src.blocks, g_dst.blocks):
                b_dst.context.load_from(b_src.context, b_src.ls1.gamma)
                b_dst.transformer.load_from(b_src.transformer, b_src.ls2.gamma)
        return fused.train(self.training)


@torch.no_grad()
def calibrate_kernels(model: ParagonSR2, batches: Iterable[torch.Tensor]) -> int:
    """Set every tracked kernel to the mean generated kernel over `batches` (real LR images).

    Runs the dynamic path, so each layer sees the activations it was trained on. Returns the number
    of images used. Works on initialised and uninitialised kernels alike.
    """
    if model.fused:
        raise ValueError("cannot calibrate kernels of a fused model (its generators are gone)")
    was_training = model.training
    transformers = [t for _, t in model.transformers()]
    model.eval()
    model.set_dynamic_inference(True)
    for t in transformers:
        t._calib = (torch.zeros_like(t.tracked_kernel, dtype=torch.float64), 0)
    n = 0
    try:
        for x in batches:
            model(x)
            n += x.shape[0]
        if n == 0:
            raise ValueError("kernel calibration needs at least one image")
        for t in transformers:
            total, count = t._calib
            t.tracked_kernel.copy_((total / count).to(t.tracked_kernel.dtype))
            t.tracked_initialized.fill_(True)
    finally:
        for t in transformers:
            t._calib = None
        model.set_dynamic_inference(False)
        model.train(was_training)
    return n


def build(variant: str, *, scale: int, upsampler: str = "mks2021", fused: bool = False) -> ParagonSR2:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return ParagonSR2(scale=scale, upsampler=upsampler, fused=fused, **VARIANTS[variant])


def detect_variant(state_dict: dict[str, torch.Tensor]) -> dict:
    """Infer variant, upsampler, fused flag and (where the weights fix it) scale from keys/shapes.

    Returns {"variant", "upsampler", "scale" (int or None), "fused", "hparams"}; raises ValueError
    when the weights are not a ParagonSR2 of any registered variant.
    """
    sd = state_dict
    if "conv_in.weight" not in sd or "conv_out.weight" not in sd:
        raise ValueError("not a ParagonSR2 state dict (no conv_in.weight/conv_out.weight)")
    c, in_chans = sd["conv_in.weight"].shape[:2]
    groups = {int(k.split(".")[1]) for k in sd if k.startswith("body.")}
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith("body.0.blocks.")}
    if not groups or not blocks:
        raise ValueError("not a ParagonSR2 state dict (no body.N.blocks.M keys)")
    fused = "body.0.blocks.0.transformer.dwconv.weight" in sd
    hidden = sd["body.0.blocks.0.transformer.project_in.weight"].shape[0]
    bk = sd["body.0.blocks.0.context.dwconv_w.weight"].shape[-1]
    shape = dict(num_feat=int(c), num_groups=max(groups) + 1, num_blocks=max(blocks) + 1, band_kernel_size=int(bk))
    variant = None
    for name, args in VARIANTS.items():
        if all(args[k] == v for k, v in shape.items()) and int(c * args["ffn_expansion"]) == hidden:
            variant = name
    if variant is None:
        desc = ", ".join(f"{k}={v}" for k, v in shape.items())
        raise ValueError(f"weights match no ParagonSR2 variant ({desc}, hidden={hidden})")
    if "magic_upsampler.resample_conv.conv_h.weight" in sd:
        taps = sd["magic_upsampler.resample_conv.conv_h.weight"].shape[-1]
        upsampler, scale = ("legacy", None) if taps == 5 else ("mks2021", taps // 3)
    else:
        upsampler, scale = "pixelshuffle", int(round((sd["upsampler.weight"].shape[0] / c) ** 0.5))
    hparams = dict(VARIANTS[variant], in_chans=int(in_chans), upsampler=upsampler, fused=fused)
    return dict(variant=variant, upsampler=upsampler, scale=scale, fused=fused, hparams=hparams)
