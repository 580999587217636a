"""Models of the BinaryDNet53 paper (paper 000) and its peers, and the reference binary networks Bi-Real-Net-18 and
ReActNet-A, on the public xnorconv API.

    import models
    model = models.create("binary_dnet53", num_classes=6)        # any name of models.list_models()
    out = model(images)                                           # BinaryDNet53Output(logits, features)
    ics = models.image_complexity_score(out.features)             # paper eq. 5
    print(models.format_table([models.profile(model, 128, name="binary_dnet53")]))

`python -m models profile` prints the cost table (params, storage, MACs, activation memory) of our models;
`python -m models list` lists the registry. Run from the repository root (models/ is not installed).
"""
from .binary_dnet53 import BinaryDNet53, BinaryDNet53Output, binary_dnet53, image_complexity_score
from .birealnet import BiRealNet18, birealnet18
from .darknet import CSPDarkNet53, DarkNet53, DNet53Baseline, cspdarknet53, darknet53, dnet53_baseline
from .profile import ModelProfile, format_table, profile
from .reactnet import ReActNetA, reactnet_a
from .registry import create, list_models, model_info, torchvision_cache_path

__all__ = [
    "BiRealNet18", "BinaryDNet53", "BinaryDNet53Output", "CSPDarkNet53", "DNet53Baseline", "DarkNet53", "ModelProfile",
    "ReActNetA",
    "binary_dnet53", "birealnet18", "create", "cspdarknet53", "darknet53", "dnet53_baseline", "format_table",
    "image_complexity_score", "list_models", "model_info", "profile", "reactnet_a", "torchvision_cache_path",
]
