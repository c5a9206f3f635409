#!/usr/bin/env python3
"""Inclusive CPU time per request of one frame in a `perf record -g` profile, split by the
frames it called directly.

    perf script -i perf.data -F ip,sym > stacks.txt
    bench/perf_tree.py stacks.txt <CPU µs per request of the run> <frame substring> [rows]

The profile must sample CPU time evenly (`-e cpu-clock`) and have whole call chains (a
frame-pointer build, `RUSTFLAGS="-C force-frame-pointers=yes"`). Every sample then stands for
the same share of the run's CPU time per request. A frame is matched by substring; when it
appears more than once in a chain (recursion, nested futures), the outermost one counts.
Used for bench/results/issue18-phases-c64-20261201.md.
"""

import collections
import sys


def read_stacks(path):
    """The call chains in `perf script -F ip,sym` output, leaf first."""
    stacks, current = [], []
    with open(path) as lines:
        for line in lines:
            if not line.strip():
                if current:
                    stacks.append(current)
                    current = []
                continue
            fields = line.split(None, 1)
            current.append(fields[1].strip() if len(fields) > 1 else "?")
    if current:
        stacks.append(current)
    return stacks


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    stacks = read_stacks(sys.argv[1])
    if not stacks:
        sys.exit(f"{sys.argv[1]}: no samples")
    per_sample = float(sys.argv[2]) / len(stacks)
    frame, rows = sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else 25
    inside, callees = 0, collections.Counter()
    for stack in stacks:
        hits = [i for i, name in enumerate(stack) if frame in name]
        if not hits:
            continue
        inside += 1
        outermost = max(hits)
        callees[stack[outermost - 1][:150] if outermost > 0 else "(self)"] += 1
    print(f"{frame}: {inside * per_sample:.3f} µs/request ({inside * 100 / len(stacks):.1f} %)")
    for callee, samples in callees.most_common(rows):
        print(f"  {samples * per_sample:.3f}  {callee}")


if __name__ == "__main__":
    main()
