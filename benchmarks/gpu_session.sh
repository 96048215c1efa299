#!/usr/bin/env bash
# Everything issue 17 asks of a GPU, in one command that fits one device call (10 minutes) on
# one H200: what the README's Performance section then quotes.
#
#   benchmarks/gpu_session.sh [PART ...]      # parts: mvh_eager ray mvh_compile gpu_check (default: all, in that order)
#
# From a session that has the device tool, after benchmarks/gpu_bundle.sh made .raybundle/:
#   run(command="benchmarks/gpu_session.sh", carry=[".raybundle"], timeout_s=600)
# or, to keep each call short, two calls back to back (the machine stays warm 30 s):
#   run(command="benchmarks/gpu_session.sh mvh_eager mvh_compile gpu_check", timeout_s=420)
#   run(command="benchmarks/gpu_session.sh ray", carry=[".raybundle"], timeout_s=330)
#
# Parts, each under its own time limit and all under one deadline (570 s from the start), so
# one that overruns still leaves the others' figures:
#   mvh_eager    raygpt's step against transformers' GPT2LMHeadModel (SDPA), gpt2-small shape,
#                1024 tokens, bf16, eager, micro-batch 16 and 64 (benchmarks/model_vs_hf.py)   ~1 min
#   ray          benchmarks/gpu_ray_check.sh: raygpt train through Ray Train on the GPU, the
#                driver killed after the first checkpoint, the resume, raygpt eval, the bare step ~4 min
#   mvh_compile  the same comparison, both models compiled, micro-batch 64                        ~2 min
#   gpu_check    PYTHONPATH=. python3 benchmarks/gpu_check.py, as the README documents it        ~2 min
# Everything goes to $OUT (the device tool's folder; ./gpu-session elsewhere): session.log (all
# output) and one JSON per part; the tables are printed again at the end.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/gpu-session}
mkdir -p "$out"
cd "$repo"
export PYTHONUNBUFFERED=1 COLUMNS=170
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(mvh_eager ray mvh_compile gpu_check)
for part in "${parts[@]}"; do
    case "$part" in
        mvh_eager|ray|mvh_compile|gpu_check) ;;
        *) echo "gpu_session.sh: unknown part $part (mvh_eager, ray, mvh_compile, gpu_check)" >&2; exit 2 ;;
    esac
done
tables=$(mktemp -d)
deadline=$(( $(date +%s) + 570 ))
declare -A limit=([mvh_eager]=100 [ray]=300 [mvh_compile]=200 [gpu_check]=200)
declare -A status

run_part() {
    local part=$1
    shift
    local left=$(( deadline - $(date +%s) ))
    local seconds=$(( ${limit[$part]} < left ? ${limit[$part]} : left ))
    if [ "$seconds" -lt 30 ]; then
        status[$part]="not run: $left s left of the session's deadline"
        return
    fi
    echo "=== $part (at most $seconds s): $*"
    local started=$(date +%s)
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$tables/$part.txt"
    local code=${PIPESTATUS[0]}
    status[$part]="exit $code in $(( $(date +%s) - started )) s$([ $code -eq 124 ] && echo ' (timed out)')"
}

{
    echo "=== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, 'GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    nproc
    git log -1 --format='raygpt %h %s' 2>/dev/null || true
    for part in "${parts[@]}"; do
        case "$part" in
            mvh_eager) run_part mvh_eager python3 -m benchmarks.model_vs_hf --device cuda --mode eager --batch 16 \
                           --batch 64 --json "$out/mvh_eager.json" ;;
            mvh_compile) run_part mvh_compile python3 -m benchmarks.model_vs_hf --device cuda --mode compile \
                             --batch 64 --json "$out/mvh_compile.json" ;;
            ray) run_part ray benchmarks/gpu_ray_check.sh --device cuda --json "$out/ray_check.json" ;;
            gpu_check) run_part gpu_check env PYTHONPATH=. python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" ;;
        esac
    done
    echo "=== the parts' tables again"
    for part in "${parts[@]}"; do
        [ -f "$tables/$part.txt" ] && { echo "--- $part"; tail -n 22 "$tables/$part.txt"; }
    done
    echo "=== parts"
    for part in "${parts[@]}"; do echo "$part: ${status[$part]:-}"; done
} 2>&1 | tee "$out/session.log"
