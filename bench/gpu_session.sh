#!/usr/bin/env bash
# One call does a whole GPU session: install what the machine lacks from carried wheels, run the CUDA
# tests and the GPU benchmarks, and write every table and log into OUTDIR. Built for a machine that
# is lent for minutes and reaches no package registry; it never stops at the first failure: each
# step's exit code is recorded in OUTDIR/summary.md and the next step runs.
#
#   bash bench/gpu_wheels.sh            # beforehand, where PyPI is reachable: wheels into .whl/
#   bash bench/gpu_session.sh OUTDIR    # on the GPU machine, from the repository root
#
# Time: about 6-7 minutes on one large GPU (each step has its own time limit below, 8 minutes in all).
# Rehearse without CUDA: LEANSD_GPU_REHEARSAL=1 bash bench/gpu_session.sh OUTDIR runs every step on
# the CPU at tiny sizes (the tests skip, the benchmarks take their --tiny/CPU paths).
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
rehearsal=${LEANSD_GPU_REHEARSAL:-0}
summary="$out/summary.md"
start=$(date +%s)
{
  echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null \
    | sed 's/^/- gpu: /' || echo "- gpu: none (nvidia-smi missing)"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} > "$summary"

# Wheels carried with the working tree go into a private site folder (nothing outside is touched).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    > "$out/install.log" 2>&1 || echo "wheel install failed, see install.log" >> "$summary"
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1

# step NAME SECONDS CMD...: run with a time limit, log to OUTDIR/NAME.log, record the exit code.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $(( $(date +%s) - t0 )) |" >> "$summary"
  return 0
}

step env 60 "$py" -c "import sys, torch, diffusers, transformers; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); \
print('arch list', torch.cuda.get_arch_list() if torch.cuda.is_available() else []); \
print('diffusers', diffusers.__version__, 'transformers', transformers.__version__); \
import leansd; print('leansd imports')"

if [ "$rehearsal" = 1 ]; then
  step tests_gpu 120 "$py" -m pytest -q -p no:cacheprovider tests/gpu
  step memory 300 "$py" bench/memory.py --tiny --size 64 --steps 2
  step vae_tiles 120 "$py" bench/vae_tiles.py --size 128 --tiles 64
  step previews 300 "$py" bench/previews.py --size 64 --steps 1 --repeats 1
else
  step tests_gpu 150 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
  # SD 1.5 budgets against diffusers' offload modes in the same run, and the 4 GiB size search.
  step memory 210 "$py" bench/memory.py --plot "$out/memory.png"
  step vae_tiles 60 "$py" bench/vae_tiles.py --device cuda --precision fp16 --size 2048 --tiles 512,256
  step speed 90 "$py" bench/txt2img_speed.py --device cuda --precision full,fp16 --steps 20 --repeats 2
  step previews 60 "$py" bench/previews.py --device cuda --precision fp16 --steps 10
fi

echo >> "$summary"
echo "total: $(( $(date +%s) - start )) s" >> "$summary"
# The tables: each benchmark prints markdown; collect them in one file for docs/BENCHMARKS.md.
for f in memory vae_tiles speed previews; do
  [ -f "$out/$f.log" ] && { echo; echo "<!-- $f -->"; grep -E '^(#|\||- |largest)' "$out/$f.log"; } >> "$out/tables.md"
done
cat "$summary"
