"""Which GPU engines are built for: a small value object, so everything downstream is testable
with a fake GPU and only `query_gpu` touches the driver."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from paragon_export.errors import ParagonError


@dataclass(frozen=True)
class GpuInfo:
    name: str  # as the driver reports it, e.g. "NVIDIA H200"
    compute_capability: tuple[int, int]  # (9, 0)
    memory_mib: int | None = None
    source: str = ""  # how it was queried (cuda-python, nvidia-smi, fake)

    @property
    def sm(self) -> str:
        """'sm90' for compute capability 9.0 (the string users see in CUDA/TensorRT docs)."""
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def slug(self) -> str:
        return gpu_slug(self.name)


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s) or "gpu"


def _visible_device() -> str | None:
    """First entry of CUDA_VISIBLE_DEVICES (index or UUID): the device CUDA calls device 0."""
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    if v is None:
        return None
    first = v.split(",")[0].strip()
    if not first or first == "-1":
        raise ParagonError("no NVIDIA GPU visible: CUDA_VISIBLE_DEVICES hides every device")
    return first


def _from_cuda_python() -> GpuInfo:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python; ImportError propagates when neither exists
    ok = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()
    if err != ok or count == 0:
        raise RuntimeError(f"cudaGetDeviceCount: {err.name if hasattr(err, 'name') else err}, {count} device(s)")
    err, dev = cudart.cudaGetDevice()
    if err != ok:
        raise RuntimeError(f"cudaGetDevice: {err}")
    err, p = cudart.cudaGetDeviceProperties(dev)
    if err != ok:
        raise RuntimeError(f"cudaGetDeviceProperties: {err}")
    name = p.name.decode(errors="replace") if isinstance(p.name, (bytes, bytearray)) else str(p.name)
    return GpuInfo(name=name.split("\x00")[0].strip(), compute_capability=(int(p.major), int(p.minor)),
                   memory_mib=int(p.totalGlobalMem) // (1 << 20), source="cuda-python")


def parse_nvidia_smi(text: str) -> GpuInfo:
    """Parse one line of `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader,nounits`."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        raise RuntimeError(f"unexpected nvidia-smi output {line!r}")
    name, cc, mem = parts
    m = re.fullmatch(r"(\d+)\.(\d+)", cc)
    if not m:
        raise RuntimeError(f"nvidia-smi reports no compute capability ({cc!r}); the driver is too old")
    return GpuInfo(name=name, compute_capability=(int(m.group(1)), int(m.group(2))),
                   memory_mib=int(mem) if mem.isdigit() else None, source="nvidia-smi")


def _from_nvidia_smi() -> GpuInfo:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi not found")
    cmd = [exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"]
    dev = _visible_device()
    if dev is not None:
        cmd += ["-i", dev]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip()
                           else f"nvidia-smi exited {r.returncode}")
    return parse_nvidia_smi(r.stdout)


def query_gpu() -> GpuInfo:
    """The GPU this process builds and runs engines on (CUDA device 0 after CUDA_VISIBLE_DEVICES)."""
    _visible_device()
    reasons = []
    for query in (_from_cuda_python, _from_nvidia_smi):
        try:
            return query()
        except ImportError:
            reasons.append("cuda-python not installed")
        except FileNotFoundError:
            reasons.append("nvidia-smi not found")
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            reasons.append(str(e))
    raise ParagonError("no NVIDIA GPU found (" + "; ".join(reasons) + "): TensorRT engines must be built "
                       "on the GPU model that will run them")
