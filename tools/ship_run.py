"""Copy a trained run into the package as a shipped run: method.json + fp16 weights.safetensors.

    python tools/ship_run.py runs/af-s0 toy-maskclip-plus

Shipped runs load by name (``--model toy-maskclip-plus``, ``Segmenter.from_pretrained("toy-maskclip-plus")``).
Only the trained part is stored (the frozen CLIP it names, e.g. the toy, is reloaded), in fp16 to keep
the package small; the README's numbers for shipped runs are measured on the shipped fp16 copy.
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from vocaseg.runs import INFO_FILE, SHIPPED_RUNS_DIR, WEIGHTS_FILE, read_run_info, write_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("name")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    src, dst = Path(args.run), SHIPPED_RUNS_DIR / args.name
    if dst.exists() and not args.overwrite:
        print(f"{dst} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    info = read_run_info(src)
    if info["clip"].get("pretrained") not in ("default", None) or info["clip"]["model"] != "toy":
        print("only runs on the shipped toy CLIP can ship (the package cannot hold other CLIP weights)",
              file=sys.stderr)
        return 2
    info["shipped_from"] = str(src)
    info.pop("format", None)
    info.pop("vocaseg_version", None)
    write_run(dst, info, load_file(str(src / WEIGHTS_FILE)), fp16=True)
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    print(f"{dst}: {INFO_FILE} + {WEIGHTS_FILE} ({size:.2f} MB)")
    print(json.dumps(info.get("trained", {}).get("eval"), indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
