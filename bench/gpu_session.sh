#!/usr/bin/env bash
# One call does a whole GPU session: install what the machine lacks from carried wheels, run the CUDA
# tests and the GPU benchmarks, and write every table and log into OUTDIR. Built for a machine that
# is lent for minutes and reaches no package registry; it never stops at the first failure: each
# step's exit code is recorded in OUTDIR/summary.md and the next step runs.
#
#   bash bench/gpu_wheels.sh            # beforehand, where PyPI is reachable: wheels into .whl/
#   bash bench/gpu_session.sh OUTDIR    # on the GPU machine, from the repository root
#
# Time: at most 8 minutes on one large GPU: each step has its own time limit below, cut to what is left
# of the 8 minutes (LEANSD_GPU_SECONDS); a step that would start with under 15 s left is skipped and
# recorded so. Steps run in order of importance.
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
# The 8 minutes hold for the GPU session; a rehearsal on a shared CPU gets 30.
if [ "$rehearsal" = 1 ]; then budget=${LEANSD_GPU_SECONDS:-1800}; else budget=${LEANSD_GPU_SECONDS:-480}; fi
deadline=$(( start + budget ))
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
  local left=$(( deadline - t0 ))
  if [ "$left" -lt 15 ]; then
    echo "| $name | skipped (out of time) | 0 |" >> "$summary"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
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
  step memory_sdxl 120 "$py" bench/memory.py --tiny --family sdxl --size 64 --steps 2 --modes model_cpu_offload
  step memory_sd2 120 "$py" bench/memory.py --tiny --family sd2 --size 64 --steps 2 --modes model_cpu_offload
  step vae_tiles 120 "$py" bench/vae_tiles.py --size 128 --tiles 64
  step previews 300 "$py" bench/previews.py --size 64 --steps 1 --repeats 1
else
  step tests_gpu 120 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
  # Per family (full size, random weights, fp16): leansd's budgets against diffusers' offload modes in
  # the same run, and the largest square under a 4 GiB cap. SDXL at 1024 and SD 2.1 at 768 take few steps.
  step memory 150 "$py" bench/memory.py --steps 10 --plot "$out/memory.png"
  step memory_sdxl 130 "$py" bench/memory.py --family sdxl --steps 4 --modes model_cpu_offload,sequential_cpu_offload
  step memory_sd2 80 "$py" bench/memory.py --family sd2 --steps 6 --modes model_cpu_offload,sequential_cpu_offload
  step vae_tiles 40 "$py" bench/vae_tiles.py --device cuda --precision fp16 --size 2048 --tiles 512,256
  step speed 60 "$py" bench/txt2img_speed.py --device cuda --precision full,fp16 --steps 20 --repeats 2
  step previews 40 "$py" bench/previews.py --device cuda --precision fp16 --steps 10
fi

echo >> "$summary"
echo "total: $(( $(date +%s) - start )) s" >> "$summary"
# The tables: each benchmark prints markdown; collect them in one file for docs/BENCHMARKS.md.
for f in memory memory_sdxl memory_sd2 vae_tiles speed previews; do
  [ -f "$out/$f.log" ] && { echo; echo "<!-- $f -->"; grep -E '^(#|\||- |largest)' "$out/$f.log"; } >> "$out/tables.md"
done
# A lent machine returns at most 8 files: there the logs travel as one archive beside the tables.
if [ "$rehearsal" != 1 ] && ls "$out"/*.log >/dev/null 2>&1; then
  (cd "$out" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
cat "$summary"
