#!/usr/bin/env bash
# One-GPU smoke check: the cost bench and short runs of the shipped Shapes recipes through the real trainers
# (ReFL, Flow-GRPO-Fast, DiNa-LRM training), in fp32 and in the mixed precisions the SD3.5 recipes use, on CUDA.
#
#   bash scripts/gpu_check.sh                            # on a machine with one NVIDIA GPU (a few minutes)
#   RLKIT_CHECK_DEVICE=cpu bash scripts/gpu_check.sh     # the same command lines on the CPU (dry run, slower)
#
# Environment:
#   OUT                       where the log, summary and bench JSON go (default runs/gpu_check)
#   RLKIT_CHECK_DEVICE        cuda (default) or cpu
#   RLKIT_CHECK_RUNS          where the training runs write (default: a fresh temporary folder, removed at the end)
#   RLKIT_CHECK_KEEP_RUNS=1   keep that folder
#   RLKIT_CHECK_STEP_TIMEOUT  seconds per step (default 300 on cuda, 1200 on cpu)
#   RLKIT_CHECK_ONLY          space-separated step names to run (default: all): env bench refl_fp32 refl_resume
#                             flow_grpo_fp32 dina_lrm_fp32 refl_bf16 flow_grpo_fp16 (bf16 on cpu) dina_lrm_bf16
#                             tiny_pickscore flow_grpo_pickscore eval_reward
#   PYTHON                    the interpreter (default python3)
#
# Every rlkit command runs through the real CLI (`python3 -m rlkit ...`) inside a small wrapper that reports the
# device and dtype the generator was loaded with and the CUDA memory the process allocated, and fails the step
# when it ran on the wrong device or ended with a non-finite evaluation metric. Each step prints
# "== NAME: OK (N s)" or "== NAME: FAILED (exit N, N s)"; the script goes on past a failed step and exits 1 at
# the end if any failed. Output: $OUT/gpu_check.log (everything), $OUT/summary.txt, $OUT/bench.json.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # the Shapes world needs no hub; never wait on a network
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export HF_HUB_DISABLE_PROGRESS_BARS="${HF_HUB_DISABLE_PROGRESS_BARS:-1}"  # weight-loading bars fill the log
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

PY="${PYTHON:-python3}"
DEVICE="${RLKIT_CHECK_DEVICE:-cuda}"
case "$DEVICE" in
  cuda) DEFAULT_TIMEOUT=300 ;;
  cpu) DEFAULT_TIMEOUT=1200; export CUDA_VISIBLE_DEVICES="" ;;  # accelerate then picks the CPU too
  *) echo "RLKIT_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
export RLKIT_CHECK_DEVICE="$DEVICE"
STEP_TIMEOUT="${RLKIT_CHECK_STEP_TIMEOUT:-$DEFAULT_TIMEOUT}"
LOG_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
if [[ -n "${RLKIT_CHECK_RUNS:-}" ]]; then
  RUNS="$RLKIT_CHECK_RUNS"
  mkdir -p "$RUNS"
else
  RUNS="$(mktemp -d "${TMPDIR:-/tmp}/rlkit_gpu_check.XXXXXX")"
fi
RUNS="$(cd "$RUNS" && pwd)"
WRAP="$RUNS/rlkit_wrapped.py"

# --- the wrapper: `python3 -m rlkit ARGS` plus device / memory / finiteness checks ---------------------------
cat >"$WRAP" <<'PYEOF'
"""Runs `python -m rlkit ARGS` in this process and checks where it ran."""
import json
import math
import os
import runpy
import sys

import torch

from rlkit.models import sd3

try:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
except ImportError:
    pass

EXPECT = os.environ.get("RLKIT_CHECK_DEVICE", "cuda")
seen = []  # (device, dtype) of every generator loaded


def _loaded(original):
    def from_pretrained(cls, *args, **kwargs):
        gen = original(cls, *args, **kwargs)
        p = next(gen.transformer.parameters())
        seen.append((p.device.type, str(p.dtype)))
        print(f"[check] generator loaded: transformer on {p.device} ({p.dtype}), vae on {gen.device}", flush=True)
        return gen
    return classmethod(from_pretrained)


sd3.SD3Generator.from_pretrained = _loaded(sd3.SD3Generator.from_pretrained.__func__)

args = sys.argv[1:]
sys.argv = ["rlkit", *args]
code = 0
try:
    runpy.run_module("rlkit", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)

problems = []
if torch.cuda.is_available() and torch.cuda.is_initialized():
    peak = torch.cuda.max_memory_allocated()
    print(f"[check] CUDA {torch.cuda.get_device_name()}: max_memory_allocated {peak / 2**20:.1f} MiB", flush=True)
else:
    peak = 0
    print("[check] CUDA was not initialised in this process", flush=True)
if EXPECT == "cuda" and peak == 0:
    problems.append("nothing was allocated on the GPU")
wrong = [d for d, _ in seen if d != EXPECT]
if wrong:
    problems.append(f"a generator was loaded on {wrong[0]}, expected {EXPECT}")

# the run's metrics (trainer runs only): updates, skipped (non-finite) steps, final evaluation
if code == 0 and args and args[0].endswith((".yaml", ".yml")):
    from rlkit.config import load_recipe

    metrics_file = load_recipe(args[0], args[1:]).run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if any(k.startswith("train/") or k in ("loss", "lr") for k in r)]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    skipped = sum(1 for r in records if r.get("train/skipped"))
    print(f"[check] {metrics_file}: {len(train)} training records, {len(evals)} evaluations, "
          f"{skipped} skipped (non-finite) updates", flush=True)
    if evals:
        last = evals[-1]
        keys = [k for k in last if k.startswith("eval/") and not k.endswith("_sem")][:8]
        print("[check] last evaluation (step %s): %s" % (last.get("step"), ", ".join(
            f"{k}={last[k]:.4g}" if isinstance(last[k], (int, float)) else f"{k}={last[k]}" for k in keys)), flush=True)
        bad = [k for k, v in last.items() if k.startswith("eval/") and (not isinstance(v, (int, float))
                                                                       or not math.isfinite(v))]
        if bad:
            problems.append(f"non-finite final evaluation metrics: {bad}")
    else:
        problems.append("no evaluation was logged")
    loss_key = next((k for k in ("train/loss", "loss") if any(k in r for r in train)), None)
    if loss_key:
        losses = [r[loss_key] for r in train if loss_key in r]
        print(f"[check] {loss_key}: first {losses[0]}, last {losses[-1]}", flush=True)

for p in problems:
    print(f"[check] PROBLEM: {p}", flush=True)
sys.exit(code or (3 if problems else 0))
PYEOF

# --- steps ----------------------------------------------------------------------------------------------------
declare -a RESULTS=()
FAILED=0

should_run() {
  [[ -z "${RLKIT_CHECK_ONLY:-}" ]] && return 0
  [[ " ${RLKIT_CHECK_ONLY} " == *" $1 "* ]]
}

step() {  # step NAME COMMAND...
  local name="$1"; shift
  if ! should_run "$name"; then
    return 0
  fi
  local shown="$*"
  echo
  echo "== $name: ${shown/#"$PY $WRAP"/python3 -m rlkit}"
  local start end rc
  start=$(date +%s%N)
  if ! declare -F "$1" >/dev/null && command -v timeout >/dev/null 2>&1; then
    if timeout --kill-after=10 "$STEP_TIMEOUT" "$@"; then rc=0; else rc=$?; fi
  else
    if "$@"; then rc=0; else rc=$?; fi
  fi
  end=$(date +%s%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  if [[ $rc -eq 0 ]]; then
    echo "== $name: OK ($secs s)"
    RESULTS+=("OK      $name ($secs s)")
  else
    local why="exit $rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && why="exit $rc: timed out after ${STEP_TIMEOUT} s"
    echo "== $name: FAILED ($why, $secs s)"
    RESULTS+=("FAILED  $name ($why, $secs s)")
    FAILED=$((FAILED + 1))
  fi
}

RLKIT=("$PY" "$WRAP")  # `python3 -m rlkit`, wrapped

env_info() {
  local rc=0
  "$PY" - <<'PYEOF' || rc=$?
import importlib.metadata as md
import os
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable})")
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "tokenizers",
             "huggingface-hub", "numpy"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    print(f"  device {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
          f"{props.multi_processor_count} SMs, bf16 supported: {torch.cuda.is_bf16_supported()}")
    x = torch.randn(256, 256, device="cuda")
    print(f"  a matmul on the GPU: {float((x @ x).abs().mean()):.3f}")
expected = os.environ.get("RLKIT_CHECK_DEVICE", "cuda")
if expected == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device is visible to torch (run with RLKIT_CHECK_DEVICE=cpu for a CPU dry run)")
PYEOF
  if command -v nvidia-smi >/dev/null 2>&1 && [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
  fi
  return "$rc"
}

main() {
  echo "rlkit gpu_check: device $DEVICE, log dir $LOG_DIR, runs in $RUNS, step timeout ${STEP_TIMEOUT} s"
  if git rev-parse --git-dir >/dev/null 2>&1; then
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (modified tree)')"
  fi

  local total_start=$SECONDS
  step env env_info
  if [[ $FAILED -gt 0 ]]; then
    echo "the environment check failed; not running the rest"
  else
    local common=("output_dir=$RUNS" "checkpoint.resume=false" "checkpoint.every=0")
    local small_eval=("eval.num_prompts=18" "eval.images_per_prompt=1" "eval.batch_size=18" "eval.grid_images=9")
    local refl=("refl.batch_size=4" "${small_eval[@]}")
    local grpo=("${small_eval[@]}")
    local lrm=("reward_model.eval_limit=64" "logging.every=1"
               "reward_model.data.train=[pkg://rlkit/shapes/assets/preferences/train.parquet, shapes:drawn:64, shapes:generated:256]")
    # fp16 autocast needs a GPU (accelerate refuses it on the CPU): the CPU dry run uses bf16 there
    local half=fp16
    [[ "$DEVICE" == cpu ]] && half=bf16

    step bench "${RLKIT[@]}" bench --quick --device "$DEVICE" --json "$LOG_DIR/bench.json"
    # ReFL: 8 updates, evaluations at 0, 4, 8; then resumed from its final checkpoint for 2 more updates
    step refl_fp32 "${RLKIT[@]}" recipes/refl_shapes.yaml "${common[@]}" name=refl_fp32 \
      refl.max_steps=8 eval.every=4 "${refl[@]}"
    step refl_resume "${RLKIT[@]}" recipes/refl_shapes.yaml "${common[@]}" name=refl_fp32 checkpoint.resume=true \
      refl.max_steps=10 eval.every=0 "${refl[@]}"
    # Flow-GRPO-Fast: 3 epochs of the recipe's 64 images (4 prompts x 16), 2 updates each
    step flow_grpo_fp32 "${RLKIT[@]}" recipes/flow_grpo_shapes.yaml "${common[@]}" name=flow_grpo_fp32 \
      flow_grpo.max_epochs=3 eval.every=2 "${grpo[@]}"
    # DiNa-LRM training on the shipped preference pairs (EMA on), 10 steps, held-out accuracy at 5 and 10
    step dina_lrm_fp32 "${RLKIT[@]}" recipes/dina_lrm_shapes.yaml "${common[@]}" name=dina_lrm_fp32 \
      reward_model.max_steps=10 reward_model.eval_every=5 "${lrm[@]}"
    # the precisions of the SD3.5 recipes: frozen weights in bf16/fp16, LoRA / trained weights fp32, autocast
    step refl_bf16 "${RLKIT[@]}" recipes/refl_shapes.yaml "${common[@]}" name=refl_bf16 \
      model.dtype=bf16 launch.mixed_precision=bf16 refl.max_steps=4 eval.every=0 "${refl[@]}"
    step "flow_grpo_$half" "${RLKIT[@]}" recipes/flow_grpo_shapes.yaml "${common[@]}" "name=flow_grpo_$half" \
      "model.dtype=$half" "launch.mixed_precision=$half" flow_grpo.max_epochs=2 eval.every=0 "${grpo[@]}"
    step dina_lrm_bf16 "${RLKIT[@]}" recipes/dina_lrm_shapes.yaml "${common[@]}" name=dina_lrm_bf16 \
      model.dtype=bf16 launch.mixed_precision=bf16 reward_model.max_steps=10 reward_model.eval_every=0 "${lrm[@]}"
    # a pixel reward that loads its own model (PickScore with tiny random weights), as the SD3.5 pickscore
    # recipes use it: decode, score, group advantages and the update on the generator's device
    local pickscore="$RUNS/tiny_pickscore"
    step tiny_pickscore "$PY" -c "import sys; from rewards.tiny import save_tiny_pickscore; save_tiny_pickscore(sys.argv[1])" \
      "$pickscore"
    step flow_grpo_pickscore "${RLKIT[@]}" recipes/flow_grpo_shapes.yaml "${common[@]}" name=flow_grpo_pickscore \
      rewards.0.name=pickscore "rewards.0.args={model: $pickscore, processor: $pickscore}" \
      flow_grpo.max_epochs=1 eval.every=0 "${grpo[@]}"
    # `rlkit eval-reward` with a DiNa-LRM that loads its own backbone (the shipped Shapes one), on the device
    step eval_reward "${RLKIT[@]}" eval-reward --reward dina-lrm --device "$DEVICE" --no-progress \
      --args pretrained=rlkit/shapes/assets/dina_lrm base_model=pkg://rlkit/shapes/assets/generator \
      --data rlkit/shapes/assets/preferences/eval.parquet --format latents --columns chosen=latents_a rejected=latents_b \
      --levels 0.1,0.4,0.7 --limit 64
  fi

  echo
  {
    echo "rlkit gpu_check summary (device $DEVICE, $((SECONDS - total_start)) s in all)"
    printf '  %s\n' ${RESULTS[@]+"${RESULTS[@]}"}
    if [[ $FAILED -gt 0 ]]; then echo "$FAILED step(s) FAILED"; else echo "all steps passed"; fi
  } | tee "$LOG_DIR/summary.txt"
  [[ $FAILED -eq 0 ]]
}

cleanup() {
  if [[ -z "${RLKIT_CHECK_RUNS:-}" && "${RLKIT_CHECK_KEEP_RUNS:-0}" != 1 ]]; then
    rm -rf "$RUNS"
  fi
}
trap cleanup EXIT

set +e
main 2>&1 | tee "$LOG_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
exit "$status"
