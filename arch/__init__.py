"""ParagonSR2 networks. Imports nothing from the rest of the toolkit."""

from .magic import MagicUpsampler, magic_kernel_taps
from .munet import MUNet
from .paragonsr2 import UPSAMPLERS, VARIANTS, ParagonSR2, build, calibrate_kernels, detect_variant

__all__ = [
    "MagicUpsampler", "magic_kernel_taps", "MUNet", "ParagonSR2", "UPSAMPLERS", "VARIANTS", "build",
    "calibrate_kernels", "detect_variant",
]
