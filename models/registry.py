"""One registry for every model of the paper's tables: `create(name, num_classes, pretrained=False, **kwargs)`.

Our models (darknet53, cspdarknet53, dnet53_baseline, binary_dnet53 and its variants; the reference binary networks
birealnet18 (Bi-Real Net, Liu et al. 2018) and reactnet_a (ReActNet, Liu et al. 2020) with their float twins) and the
reference float models through torchvision: resnet50, densenet121, densenet201 (MonkeyNet, Bala et al.),
mobilenet_v2 (Jaradat et al.), vit_b_16 (ViT) from paper 000's tables; mobilenet_v3_small/large, efficientnet_b0,
swin_v2_t from papers 001-003.

Pretrained weights are never downloaded here (training machines are often offline, and a silent download in a
library call is a surprise). `pretrained` is
  * False: random initialisation;
  * a path: a local file holding a state_dict (or a checkpoint dict with a 'state_dict' / 'model' entry);
  * True: torchvision models only, the default ImageNet weights from torchvision's cache
    (`<torch.hub.get_dir()>/checkpoints/<file>`); when absent, FileNotFoundError says how to get them.
The classification layer is kept when its shape matches num_classes and re-initialised otherwise; every other
key must match exactly. vit_b_16 is built for 128x128 inputs by default (the paper's size; torchvision's default
is 224): pass image_size=224 to change it; ImageNet position embeddings are interpolated to the chosen size.
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union

import torch
import torchvision
from torch import nn

from .binary_dnet53 import binary_dnet53
from .birealnet import birealnet18
from .darknet import cspdarknet53, darknet53, dnet53_baseline
from .reactnet import reactnet_a

__all__ = ["ModelInfo", "create", "list_models", "model_info", "torchvision_cache_path"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    head: Tuple[str, ...]        # state_dict prefixes of the classification layer
    source: str                  # "xnorconv" (models/) or "torchvision"
    description: str
    defaults: Tuple[Tuple[str, object], ...] = ()   # keyword defaults applied by create()


def _torchvision_builder(tv_name: str):
    def build(num_classes: int, **kwargs):
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    build.__name__ = tv_name
    return build


def _binary_variant(**fixed):
    return _variant(binary_dnet53, **fixed)


def _variant(builder, **fixed):
    def build(num_classes: int, **kwargs):
        return builder(num_classes, **{**fixed, **kwargs})
    build.__name__ = builder.__name__
    return build


_REGISTRY: Dict[str, ModelInfo] = {}


def _register(info: ModelInfo):
    _REGISTRY[info.name] = info


_register(ModelInfo("darknet53", darknet53, ("head.fc.",), "xnorconv",
                    "Darknet-53 classifier (YOLOv3 backbone); paper 000's DarkNet53 row"))
_register(ModelInfo("cspdarknet53", cspdarknet53, ("head.fc.",), "xnorconv",
                    "CSP-DarkNet-53 classifier (YOLOv4 backbone)"))
_register(ModelInfo("dnet53_baseline", dnet53_baseline, ("classifier.",), "xnorconv",
                    "paper 000 Fig. 2 float baseline: CSP stages + SPPF + top-down concat + 1024-d FC"))
_register(ModelInfo("binary_dnet53", binary_dnet53, ("classifier.",), "xnorconv",
                    "paper 000 Fig. 6 BinaryDNet53, full XNOR (binary weights and activations)"))
_register(ModelInfo("binary_dnet53_bwn", _binary_variant(binary_activations=False), ("classifier.",), "xnorconv",
                    "BinaryDNet53 with binary weights only (the paper's literal model)"))
_register(ModelInfo("binary_dnet53_float", _binary_variant(binary=False), ("classifier.",), "xnorconv",
                    "float twin of binary_dnet53 (same architecture, nn.Conv2d)"))
_register(ModelInfo("birealnet18", birealnet18, ("fc.",), "xnorconv",
                    "Bi-Real-Net-18 (Liu et al., ECCV 2018): binary ResNet-18 with a real shortcut per binary conv"))
_register(ModelInfo("birealnet18_float", _variant(birealnet18, binary=False), ("fc.",), "xnorconv",
                    "float twin of birealnet18 (same architecture, nn.Conv2d on clip(x, -1, 1))"))
_register(ModelInfo("reactnet_a", reactnet_a, ("fc.",), "xnorconv",
                    "ReActNet-A (Liu et al., ECCV 2020): binary MobileNetV1 blocks with RSign and RPReLU"))
_register(ModelInfo("reactnet_a_float", _variant(reactnet_a, binary=False), ("fc.",), "xnorconv",
                    "float twin of reactnet_a (same architecture, nn.Conv2d on x - t)"))

_TORCHVISION = {
    "resnet50": (("fc.",), "ResNet-50 (paper 000 Tables 3-6)"),
    "densenet121": (("classifier.",), "DenseNet-121 (paper 000 Tables 3-6)"),
    "densenet201": (("classifier.",), "DenseNet-201, MonkeyNet's detector (Bala et al., paper 000)"),
    "mobilenet_v2": (("classifier.1.",), "MobileNetV2, Jaradat et al. (paper 000)"),
    "vit_b_16": (("heads.head.",), "ViT-B/16 (paper 000's ViT row)"),
    "mobilenet_v3_small": (("classifier.3.",), "MobileNetV3-Small (paper 001)"),
    "mobilenet_v3_large": (("classifier.3.",), "MobileNetV3-Large (paper 002)"),
    "efficientnet_b0": (("classifier.1.",), "EfficientNet-B0 (paper 003)"),
    "swin_v2_t": (("head.",), "Swin-V2-T, the teacher of paper 002"),
}
for _name, (_head, _desc) in _TORCHVISION.items():
    _register(ModelInfo(_name, _torchvision_builder(_name), _head, "torchvision", _desc,
                        (("image_size", 128),) if _name == "vit_b_16" else ()))


def list_models() -> List[str]:
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def torchvision_cache_path(name: str) -> Tuple[str, str]:
    """(path in torchvision's cache, download URL) of the default ImageNet weights of a torchvision model."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)), weights.url


def create(name: str, num_classes: int, pretrained: Union[bool, PathLike] = False, **kwargs) -> nn.Module:
    """Builds model `name` with a `num_classes`-way classifier. See the module docstring for `pretrained`."""
    info = model_info(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    kwargs = {**dict(info.defaults), **kwargs}
    model = info.builder(num_classes, **kwargs)
    if pretrained is False or pretrained is None:
        return model
    if pretrained is True:
        if info.source != "torchvision":
            raise ValueError(f"{name} has no published pretrained weights; pass pretrained='/path/to/checkpoint.pth' "
                             f"(a state_dict, or a checkpoint dict with a 'state_dict' or 'model' entry, saved from this "
                             f"model)")
        path, url = torchvision_cache_path(name)
        if not os.path.isfile(path):
            enum = torchvision.models.get_model_weights(name).DEFAULT
            raise FileNotFoundError(
                f"pretrained weights for {name} are not in torchvision's cache: {path} does not exist, and models "
                f"never downloads. Fetch them once on a machine with network access, e.g.\n"
                f"  python -c \"import torchvision; torchvision.models.get_weight('{enum.__class__.__name__}."
                f"{enum.name}').get_state_dict(progress=True)\"\n"
                f"or download {url} to {path} (TORCH_HOME moves the cache), or pass pretrained='/path/to/file.pth'.")
    else:
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained={path!r}: no such file (expected a state_dict saved with "
                                    f"torch.save)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained={path!r} does not hold a state_dict of tensors")
    _load_backbone(model, dict(state), info, path, kwargs)
    return model


def _load_backbone(model: nn.Module, state: Dict[str, torch.Tensor], info: ModelInfo, path: str, kwargs):
    """Loads every key; the classification layer only when its shape matches (otherwise it keeps its fresh init)."""
    if info.name == "vit_b_16" and "encoder.pos_embedding" in state:
        from torchvision.models.vision_transformer import interpolate_embeddings
        state = dict(interpolate_embeddings(model.image_size, model.patch_size, state))
    own = model.state_dict()
    head_keys = [k for k in own if k.startswith(info.head)]
    for key in head_keys:
        if key in state and state[key].shape != own[key].shape:
            del state[key]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        raise ValueError(f"pretrained={path!r} does not fit {info.name}{' ' + str(kwargs) if kwargs else ''}: "
                         f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
                         f"{result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}")
