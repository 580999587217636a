"""Model plumbing on the public APIs of `models` and `xnorconv`: build from a config, split outputs into
(logits, features), load checkpoints, freeze binary models, measure latency."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["build_model", "split_output", "has_binary_layers", "freeze_model", "measure_latency",
           "load_checkpoint", "model_from_checkpoint"]


def build_model(cfg, num_classes: int, binary: Optional[bool] = None) -> nn.Module:
    """models.create(cfg.model, num_classes, pretrained, **model_kwargs), plus `dropout` when the model takes it
    and `binary` (False = the float twin, for two-step training)."""
    import models

    kwargs: Dict[str, Any] = dict(cfg.model_kwargs)
    if binary is not None:
        kwargs["binary"] = binary
    pretrained: Any = {"": False, "imagenet": True}.get(cfg.pretrained, cfg.pretrained)

    def create(kw):
        try:
            return models.create(cfg.model, num_classes, pretrained=pretrained, **kw)
        except TypeError as e:
            if binary is not None and "binary" in str(e):
                raise ValueError(f"model {cfg.model!r} has no float twin (binary=False); two-step training "
                                 f"(two_step_epochs > 0) needs one, e.g. binary_dnet53") from e
            raise

    if "dropout" not in kwargs:
        try:
            return create({**kwargs, "dropout": cfg.dropout})
        except TypeError as e:
            if "dropout" not in str(e):
                raise
    return create(kwargs)  # the model takes no dropout argument


def split_output(out) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A model returns logits, or (logits, features) as a tuple/namedtuple, or an object with .logits/.features
    (BinaryDNet53Output). Returns (logits, features or None)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if hasattr(out, "logits"):
        return out.logits, getattr(out, "features", None)
    if isinstance(out, dict):
        return out["logits"], out.get("features")
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    raise TypeError(f"cannot read logits from a model output of type {type(out).__name__}")


def has_binary_layers(model: nn.Module) -> bool:
    import xnorconv
    cls = getattr(xnorconv, "BinaryConv2d", None)
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def binary_parameter_ids(model: nn.Module) -> set:
    """ids of the latent weights of every xnorconv.BinaryConv2d (for a separate weight-decay group)."""
    import xnorconv
    cls = getattr(xnorconv, "BinaryConv2d", None)
    if cls is None:
        return set()
    return {id(m.weight) for m in model.modules() if isinstance(m, cls) and getattr(m, "weight", None) is not None}


def freeze_model(model: nn.Module) -> nn.Module:
    """A packed, inference-only copy of a model with BinaryConv2d layers (xnorconv.freeze on a deep copy)."""
    import xnorconv
    if not hasattr(xnorconv, "freeze"):
        raise RuntimeError("this xnorconv build has no xnorconv.freeze; cannot run the packed kernels")
    m = copy.deepcopy(model).cpu().eval()
    frozen = xnorconv.freeze(m)
    return (frozen if frozen is not None else m).eval()


@torch.no_grad()
def measure_latency(model: nn.Module, image_size: int, device: torch.device, runs: int = 20,
                    warmup: int = 3) -> Dict[str, float]:
    """Median and mean wall time of one forward pass on one image (batch 1), in milliseconds."""
    model.eval()
    x = torch.rand(1, 3, image_size, image_size, device=device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(max(1, runs)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "runs": len(times),
            "threads": torch.get_num_threads(), "device": str(device)}


def load_checkpoint(path: str) -> Dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path!r} does not exist") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ValueError(f"{path!r} is not a `python -m train` checkpoint (expected keys model, config, classes)")
    return ck


def model_from_checkpoint(ck: Dict[str, Any]) -> nn.Module:
    from .config import config_from_dict
    cfg = config_from_dict(dict(ck["config"], pretrained=""))
    model = build_model(cfg, len(ck["classes"]), binary=False if ck.get("phase") == "float" else None)
    model.load_state_dict(ck["model"])
    return model.eval()
