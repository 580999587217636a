#!/usr/bin/env python3
"""Copies a generated benchmark summary into README.md, between the markers

    <!-- perf table: docs/perf/threads1/summary.md -->
    ...
    <!-- end perf table -->

The summary is written by `python -m bench --out DIR` (or re-rendered by `python -m bench --from DIR/bench.json
--out DIR`); this script only copies it, so the README's figures are never typed by hand.

    python tools/sync_readme_perf.py           # rewrite the block
    python tools/sync_readme_perf.py --check   # exit 1 if the README's block differs from the file
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- perf table: (?P<src>\S+) -->\n)(?P<body>.*?)(<!-- end perf table -->)", re.S)


def synced(readme):
    m = BLOCK.search(readme)
    if not m:
        raise SystemExit("README.md has no '<!-- perf table: FILE -->' ... '<!-- end perf table -->' block")
    body = (ROOT / m["src"]).read_text()
    return readme[:m.start("body")] + body + readme[m.end("body"):]


def main(argv):
    path = ROOT / "README.md"
    readme = path.read_text()
    new = synced(readme)
    if "--check" in argv:
        if new != readme:
            print("README.md's performance table differs from its source file: run python tools/sync_readme_perf.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
