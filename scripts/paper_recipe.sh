#!/usr/bin/env bash
# The paper's training settings (arXiv 2603.07079, Sec. 5.1 / App. A) as one launcher.
#
#   bash scripts/paper_recipe.sh SETTING ALGO [DATASET] [extra hydra overrides...]
#     SETTING  qwen3-0.6b-math | qwen3-1.7b-math | qwen3-4b-dapo   (student, and its default dataset)
#     ALGO     opd | eopd | eopd_grpo | eopd_server
#     DATASET  math_train | dapo_math | deepmath (files of scripts/prepare_data.py in DATA_DIR), or a path to a
#              verl RL parquet file (relative: to the directory you run this in); default: the setting's
#              (math_train for *-math, dapo_math for *-dapo).
#              A dataset other than the setting's goes into the run name (<setting>_<algo>_<dataset>; a file:
#              <file stem>-<8 hex of its absolute path>), so its checkpoints never mix with another run's.
#
# Environment (defaults in brackets):
#   DATA_DIR [data/math]          output of scripts/prepare_data.py
#   TEACHER  [Qwen/Qwen3-8B]      chat teacher, scored without thinking (enable_thinking=false)
#   NNODES [1]  GPUS_PER_NODE [8] one node, or a Ray cluster (start it first, see docs/recipes.md)
#   ROLLOUT_TP [1]                vLLM tensor parallel size of the student rollout
#   TEACHER_GPUS [4]              eopd_server only: GPUs of each node given to verl's teacher pool, the rest
#                                 train (one 8-GPU node: 4 + 4)
#   CKPT_DIR [checkpoints/verl-eopd/<name>]   (DATA_DIR and CKPT_DIR are made absolute: Ray workers on other
#                                 nodes do not share this directory)
#   WANDB_API_KEY                 set: wandb is added to the loggers [console,file,tensorboard]
#   PRINT=1                       print the command (one argument a line) and exit: nothing is composed or run
#   DRY_RUN=1                     print the composed config (hydra's --cfg job) instead of training
#
# The paper's training values are the presets of algorithm=opd/eopd (verl_eopd/conf/algorithm/eopd.yaml:
# 128 prompts per step, 1 rollout at T = 1.0, top-p 1.0, responses up to 4096 tokens, PPO mini-batch 32,
# AdamW lr 3e-6 cosine to 0, no warmup, weight decay 0.01, grad clip 1.0; tau = 0.8, alpha = 1.0, k = 16,
# clip 0.2); this script sets the models, data, epochs (MATH: 3; DAPO-Math-17k (en): 2; DeepMath-103K or a
# file: 1, not a paper setting; trainer.total_epochs=N after the names overrides it) and parallelism.
# eopd_grpo (not in the paper): 8 rollouts per prompt, GRPO on the math reward plus the EOPD term.
set -euo pipefail
CALLER_DIR="$PWD"  # a relative DATASET file is taken from here (DATA_DIR, CKPT_DIR: from the repository root)
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"  # the project's environment, not whatever `python` is first
SETTING="${1:?usage: paper_recipe.sh SETTING ALGO [overrides]}"
ALGO="${2:?usage: paper_recipe.sh SETTING ALGO [DATASET] [overrides]}"
shift 2
DATASET=""
if [ "$#" -gt 0 ] && [[ "$1" != *=* ]] && [[ "$1" != -* ]]; then DATASET="$1"; shift; fi

case "$SETTING" in
  qwen3-0.6b-math) STUDENT=Qwen/Qwen3-0.6B-Base; DEFAULT_DATA=math_train ;;
  qwen3-1.7b-math) STUDENT=Qwen/Qwen3-1.7B-Base; DEFAULT_DATA=math_train ;;
  qwen3-4b-dapo)   STUDENT=Qwen/Qwen3-4B-Base;   DEFAULT_DATA=dapo_math ;;
  *) echo "paper_recipe.sh: unknown SETTING '$SETTING' (qwen3-0.6b-math | qwen3-1.7b-math | qwen3-4b-dapo)" >&2; exit 2 ;;
esac
DATASET="${DATASET:-$DEFAULT_DATA}"
DATA_DIR="$(realpath -m "${DATA_DIR:-data/math}")"
case "$DATASET" in
  math_train) EPOCHS=3; TAG=$DATASET; TRAIN_FILE="$DATA_DIR/$DATASET.parquet" ;;
  dapo_math)  EPOCHS=2; TAG=$DATASET; TRAIN_FILE="$DATA_DIR/$DATASET.parquet" ;;
  deepmath)   EPOCHS=1; TAG=$DATASET; TRAIN_FILE="$DATA_DIR/$DATASET.parquet" ;;
  *.parquet)
    EPOCHS=1; TRAIN_FILE="$(cd "$CALLER_DIR" && realpath -m "$DATASET")"
    STEM="$(basename "$TRAIN_FILE" .parquet | tr -c 'A-Za-z0-9_.\n-' '-')"
    TAG="${STEM}-$(printf '%s' "$TRAIN_FILE" | sha256sum | cut -c1-8)" ;;
  *) echo "paper_recipe.sh: unknown DATASET '$DATASET' (math_train | dapo_math | deepmath, or a .parquet file from scripts/prepare_data.py)" >&2; exit 2 ;;
esac
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
POOL=()
case "$ALGO" in
  opd|eopd|eopd_grpo) TRAIN_GPUS=$GPUS_PER_NODE ;;
  eopd_server)
    TEACHER_GPUS="${TEACHER_GPUS:-4}"
    TRAIN_GPUS=$((GPUS_PER_NODE - TEACHER_GPUS))
    if [ "$TEACHER_GPUS" -lt 1 ] || [ "$TRAIN_GPUS" -lt 1 ]; then
      echo "paper_recipe.sh: TEACHER_GPUS=$TEACHER_GPUS leaves no GPU for the teacher or the trainer on a $GPUS_PER_NODE-GPU node. Fix: TEACHER_GPUS=$((GPUS_PER_NODE / 2))" >&2; exit 2
    fi
    POOL=(distillation.n_gpus_per_node="$TEACHER_GPUS" distillation.nnodes="${NNODES:-1}") ;;
  *) echo "paper_recipe.sh: unknown ALGO '$ALGO' (opd | eopd | eopd_grpo | eopd_server)" >&2; exit 2 ;;
esac

# one run name per algorithm and dataset: resume_mode=auto never picks another run's checkpoint (the setting's
# own dataset keeps the name <setting>_<algo> runs had before DATASET existed, so they still resume)
NAME="${SETTING}_${ALGO}"
if [ "$DATASET" != "$DEFAULT_DATA" ]; then NAME="${NAME}_${TAG}"; fi
for f in "$TRAIN_FILE" "$DATA_DIR/math500.parquet"; do
  if [ ! -f "$f" ] && [ "${DRY_RUN:-0}" != 1 ] && [ "${PRINT:-0}" != 1 ]; then
    fix="python scripts/prepare_data.py --out-dir $DATA_DIR"
    case "$(basename "$f" .parquet)" in math_train|dapo_math|deepmath|math500) fix="$fix --datasets $(basename "$f" .parquet)" ;; esac
    echo "paper_recipe.sh: $f not found. Fix: $fix" >&2; exit 2
  fi
done
LOGGER='[console,file,tensorboard]'  # where each writes: docs/recipes.md, "Watch the run"
if [ -n "${WANDB_API_KEY:-}" ]; then LOGGER='[console,file,tensorboard,wandb]'; fi

ARGS=(
  algorithm="$ALGO"
  actor_rollout_ref.model.path="$STUDENT"
  distillation.teacher_models.teacher_model.model_path="${TEACHER:-Qwen/Qwen3-8B}"
  data.train_files="$TRAIN_FILE"
  data.val_files="$DATA_DIR/math500.parquet"
  data.filter_overlong_prompts=true
  data.apply_chat_template_kwargs.enable_thinking=false
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.tensor_model_parallel_size="${ROLLOUT_TP:-1}"
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.val_kwargs.do_sample=false
  actor_rollout_ref.actor.use_dynamic_bsz=true
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
  actor_rollout_ref.model.enable_gradient_checkpointing=true
  trainer.total_epochs=$EPOCHS
  trainer.nnodes="${NNODES:-1}"
  trainer.n_gpus_per_node="$TRAIN_GPUS"
  "${POOL[@]}"
  trainer.project_name=verl-eopd
  trainer.experiment_name="$NAME"
  trainer.logger="$LOGGER"
  trainer.val_before_train=true
  trainer.test_freq=25
  trainer.save_freq=50
  trainer.default_local_dir="$(realpath -m "${CKPT_DIR:-checkpoints/verl-eopd/$NAME}")"
  trainer.max_actor_ckpt_to_keep=2
)
if [ "${PRINT:-0}" = 1 ]; then
  printf '%s\n' "$PY" -m verl_eopd.main "${ARGS[@]}" "$@"
  exit 0
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  exec "$PY" -m verl_eopd.main "${ARGS[@]}" "$@" --cfg job
fi
exec "$PY" -m verl_eopd.main "${ARGS[@]}" "$@"
