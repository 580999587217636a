"""python -m xnorconv: what a bug report needs."""
from . import build_info


def main():
    info = build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
