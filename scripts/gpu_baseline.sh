#!/usr/bin/env bash
# An earlier commit's code for a before/after run on the GPU machine, in one device call: writes to
# .gpu/baseline/ that commit's version of every Python file that differs from this tree (files added since are
# left as they are). `bash scripts/gpu_checks.sh benchbase bench` there then runs the bench on the earlier code
# (rows tagged -base), puts this tree's files back, and runs it again on this tree.
#     bash scripts/gpu_baseline.sh REV [PATHSPEC...]
# PATHSPECs limit it to those files (e.g. router/ when the benchmark scripts changed too and must stay this tree's).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/gpu_baseline.sh REV [PATHSPEC...]}
shift
[ $# -gt 0 ] || set -- .
rm -rf .gpu/baseline
mkdir -p .gpu/baseline
n=0
while read -r f; do
  if git cat-file -e "$rev:$f" 2>/dev/null; then
    mkdir -p ".gpu/baseline/$(dirname "$f")"
    git show "$rev:$f" > ".gpu/baseline/$f"
    n=$((n + 1))
  fi
done < <(git diff --name-only "$rev" -- "$@" | grep '\.py$')
git rev-parse "$rev" > .gpu/baseline/REV
echo "gpu_baseline: $n files of $(cut -c1-10 .gpu/baseline/REV) in .gpu/baseline"
