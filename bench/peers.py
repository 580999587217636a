"""Other implementations measured beside xnorconv, when their packages are installed."""
import importlib.util


def openvino_available():
    return importlib.util.find_spec("openvino") is not None
