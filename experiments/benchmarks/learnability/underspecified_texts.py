"""How often a concise / user-like instruction drops a colour or position word that the detailed one names
(learnability round 14): for add, compose and replace those words fix the ground truth, so such a row teaches the
x0 loss a mean over colours and places.

    python experiments/benchmarks/learnability/underspecified_texts.py <corpus>/manifest.parquet
"""

import collections
import re
import sys

import pyarrow.parquet as pq

from rededit.datagen.synth.scene import BACKGROUND_COLOURS, OBJECT_COLOURS
from rededit.datagen.synth.text import POSITIONS_EN

words = sorted(
    {c.name for c in OBJECT_COLOURS + BACKGROUND_COLOURS} | set(POSITIONS_EN), key=len, reverse=True
)
pat = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.I)


def found(t):
    return collections.Counter(m.lower() for m in pat.findall(t or ""))


rows = pq.read_table(sys.argv[1]).to_pylist()
stat = collections.defaultdict(lambda: collections.Counter())
for r in rows:
    if r["split"] != "train" or not r["references"] or r["inverse_of"]:
        continue
    d = found(r["instruction"])
    for style in ("instruction_concise", "instruction_user"):
        s = found(r[style])
        stat[(r["task"], style)]["n"] += 1
        stat[(r["task"], style)]["drops"] += bool(d - s)
for (task, style), c in sorted(stat.items()):
    print(f"{task:10s} {style:20s} {c['drops'] / c['n']:.2f} of {c['n']}")
