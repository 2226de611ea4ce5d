#!/usr/bin/env bash
# Run (or resume) the pre-registered controlled comparison with the code it was registered with:
# the package at a316790 and benchmarks/controlled.py as committed with benchmarks/protocol.md
# (6b0f3cd), in a git worktree outside the checkout, so that later changes to the package cannot
# change its runs. Finished runs go to this checkout's benchmarks/results/controlled.json (committed);
# stored runs are skipped, an interrupted run resumes from its last.pth.tar if WORK still holds it.
#
#   bash benchmarks/controlled_frozen.sh /tmp/cifar10 [WORK]     # WORK: run folders (default /tmp/ctl)
set -euo pipefail
data=${1:?usage: controlled_frozen.sh CIFAR10_DIR [WORK_DIR]}
work=${2:-/tmp/ctl}
repo=$(cd "$(dirname "$0")/.." && pwd)
frozen=${FROZEN:-/tmp/stim-frozen}
python=${PYTHON:-$repo/.venv/bin/python}
if [ ! -d "$frozen" ]; then
    git -C "$repo" worktree add --detach "$frozen" a316790
    git -C "$repo" show 6b0f3cd:benchmarks/controlled.py > "$frozen/benchmarks/controlled.py"
fi
cd "$frozen"
PYTHONPATH="$frozen" exec "$python" benchmarks/controlled.py --data-dir "$data" --work-dir "$work" --parallel 2 \
    --store "$repo/benchmarks/results/controlled.json" --out "$repo/benchmarks/results/controlled.md"
