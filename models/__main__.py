"""python -m models profile [--models NAME ...] [--all] [--size 128] [--classes 6]
python -m models list"""
import argparse
import platform
import sys
from datetime import datetime, timezone

import torch

from . import create, format_table, list_models, model_info, profile

DEFAULT_MODELS = ["darknet53", "cspdarknet53", "dnet53_baseline", "binary_dnet53", "binary_dnet53_bwn",
                  "binary_dnet53_float", "birealnet18", "birealnet18_float", "reactnet_a", "reactnet_a_float"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="print the cost table (params, storage, MACs, activations) of models")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--models", nargs="+", default=None, metavar="NAME",
                       help=f"models to profile (default: {' '.join(DEFAULT_MODELS)})")
    which.add_argument("--all", action="store_true", help="every registered model, torchvision references included")
    p.add_argument("--size", type=int, default=128, help="input height and width (default 128, the paper's)")
    p.add_argument("--classes", type=int, default=6, help="number of classes (default 6, MSLD v2.0)")
    sub.add_parser("list", help="list the registered models")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in list_models():
            info = model_info(name)
            print(f"{name:22s} {info.source:12s} {info.description}")
        return 0

    names = list_models() if args.all else (args.models or DEFAULT_MODELS)
    for name in names:
        model_info(name)  # fail early on a typo
    torch.manual_seed(0)
    profiles = []
    for name in names:
        model = create(name, args.classes)
        profiles.append(profile(model, args.size, name=name))
        del model
    print(f"# python -m models profile {' '.join(sys.argv[2:] if argv is None else argv[1:])}".rstrip())
    print(f"# input 1x3x{args.size}x{args.size}, {args.classes} classes; torch {torch.__version__}, "
          f"{platform.machine()}, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(format_table(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
