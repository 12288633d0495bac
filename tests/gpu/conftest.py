# tests/gpu/ holds scripts for a machine with an NVIDIA GPU and TensorRT (run them directly);
# pytest on CPU must never collect them.
collect_ignore = ["smoke.py"]
