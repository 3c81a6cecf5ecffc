"""Compare two output folders of research/layout_equality_train.sh: weights byte for byte, config.json and
the evaluate JSON equal once wall-clock fields (any key containing "seconds") and the run's own paths are
dropped. Prints one line per file and exits 1 on any difference.

Usage: python research/layout_equality_compare.py BEFORE_DIR AFTER_DIR
"""

import json
import sys
from pathlib import Path


def clean(x, root):
    if isinstance(x, dict):
        return {k: clean(v, root) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [clean(v, root) for v in x]
    if isinstance(x, str):
        return x.replace(root + "/first", "<run>/first")  # the compressed files each run made
    return x


a, b = Path(sys.argv[1]), Path(sys.argv[2])
bad = 0
for f in sorted((a / "bundle").iterdir()):
    g = b / "bundle" / f.name
    if f.suffix == ".json":
        same = clean(json.loads(f.read_text()), str(a)) == clean(json.loads(g.read_text()), str(b))
    else:
        same = f.read_bytes() == g.read_bytes()
    print(f"bundle/{f.name}: {'same' if same else 'DIFFERENT'}")
    bad += not same
for f in sorted(a.glob("eval-*.json")):
    same = clean(json.loads(f.read_text()), str(a)) == clean(json.loads((b / f.name).read_text()), str(b))
    print(f"{f.name}: {'same' if same else 'DIFFERENT'}")
    bad += not same
sys.exit(1 if bad else 0)
