"""The one place that imports TensorRT (lazily: `import engines` must work without it)."""

from __future__ import annotations

from paragon_export.errors import ParagonError

INSTALL_HINT = ("install it with `pip install 'paragon-export[trt]'` on a machine with an NVIDIA GPU and driver "
                "(engines are built on the GPU model that will run them)")
MIN_MAJOR = 10


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ParagonError(f"cannot read the TensorRT version {version!r}") from None


def strongly_typed_only(version: str) -> bool:
    """TensorRT 11 is always strongly typed (trtexec takes no `--stronglyTyped`); 10 must be asked to be."""
    return trt_major(version) >= 11


def require_tensorrt():
    """Import and return the `tensorrt` module, or fail with one line saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        missing = getattr(e, "name", None) in (None, "tensorrt")
        why = "TensorRT is not installed" if missing else f"TensorRT failed to import ({e})"
        raise ParagonError(f"{why}: {INSTALL_HINT}") from None
    except OSError as e:  # the wheel is there but its CUDA libraries are not loadable
        raise ParagonError(f"TensorRT failed to load its libraries ({e}): {INSTALL_HINT}") from None
    if trt_major(trt.__version__) < MIN_MAJOR:
        raise ParagonError(f"TensorRT {trt.__version__} is too old: paragon-export needs TensorRT {MIN_MAJOR} or "
                           f"newer ({INSTALL_HINT})")
    return trt
