"""The CPU's integer-kernel ISA: ONNX Runtime's and OpenVINO's native int8 kernels give different
numbers on different ISAs (u8s8 saturation without VNNI), so every native-kernel figure names it."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Most capable first: the first match names the integer path the kernels take.
_ISA_FLAGS = (("amx", ("amx_int8",)), ("avx512-vnni", ("avx512_vnni",)), ("avx-vnni", ("avx_vnni",)),
              ("avx512", ("avx512f", "avx512bw")), ("avx2", ("avx2",)))


@functools.lru_cache(maxsize=1)
def isa() -> str:
    """amx | avx512-vnni | avx-vnni | avx512 | avx2 on x86 Linux, else the machine name (arm64, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().lower() or "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    for name, needed in _ISA_FLAGS:
        if all(f in flags for f in needed):
            return name
    return platform.machine().lower() or "unknown"
