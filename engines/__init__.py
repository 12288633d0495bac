"""TensorRT engines per GPU: identity and manifest, optimization profiles, the builder, the equivalent
trtexec command, and the engine check.

TensorRT is optional (`pip install 'paragon-export[trt]'`) and imported only inside the functions that
need it (`engines.trt.require_tensorrt`); importing this package never imports it.
"""

from .build import build_engine, rebuild_engine, verify_engine
from .gpu import GpuInfo, query_gpu
from .identity import BuildOptions, EngineKey, engine_filename, incompatibility, make_key
from .load import EngineMismatch, Target, current_target, load_engine
from .manifest import read_manifest
from .onnx_info import OnnxInfo, detect_precision, inspect_onnx
from .profile import PRESETS, Profile, choose_profile, parse_profile, preset_profile, validate_profile
from .trtexec import trtexec_command

__all__ = [
    "BuildOptions", "EngineKey", "EngineMismatch", "GpuInfo", "OnnxInfo", "PRESETS", "Profile", "Target",
    "build_engine", "choose_profile", "current_target", "detect_precision", "engine_filename", "incompatibility",
    "inspect_onnx", "load_engine", "make_key", "parse_profile", "preset_profile", "query_gpu", "read_manifest",
    "rebuild_engine", "trtexec_command", "validate_profile", "verify_engine",
]
