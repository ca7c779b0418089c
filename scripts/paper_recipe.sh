#!/usr/bin/env bash
# The paper's training settings (arXiv 2603.07079, Sec. 5.1 / App. A) as one launcher.
#
#   bash scripts/paper_recipe.sh SETTING ALGO [extra hydra overrides...]
#     SETTING  qwen3-0.6b-math | qwen3-1.7b-math | qwen3-4b-dapo
#     ALGO     opd | eopd | eopd_grpo | eopd_server
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
#   DRY_RUN=1                     print the composed config instead of training
#
# The paper's training values are the presets of algorithm=opd/eopd (verl_eopd/conf/algorithm/eopd.yaml:
# 128 prompts per step, 1 rollout at T = 1.0, top-p 1.0, responses up to 4096 tokens, PPO mini-batch 32,
# AdamW lr 3e-6 cosine to 0, no warmup, weight decay 0.01, grad clip 1.0; tau = 0.8, alpha = 1.0, k = 16,
# clip 0.2); this script sets the models, data, epochs (MATH: 3; DAPO-Math-17k (en): 2) and parallelism.
# eopd_grpo (not in the paper): 8 rollouts per prompt, GRPO on the math reward plus the EOPD term.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"  # the project's environment, not whatever `python` is first
SETTING="${1:?usage: paper_recipe.sh SETTING ALGO [overrides]}"
ALGO="${2:?usage: paper_recipe.sh SETTING ALGO [overrides]}"
shift 2

case "$SETTING" in
  qwen3-0.6b-math) STUDENT=Qwen/Qwen3-0.6B-Base; TRAIN=math_train; EPOCHS=3 ;;
  qwen3-1.7b-math) STUDENT=Qwen/Qwen3-1.7B-Base; TRAIN=math_train; EPOCHS=3 ;;
  qwen3-4b-dapo)   STUDENT=Qwen/Qwen3-4B-Base;   TRAIN=dapo_math;  EPOCHS=2 ;;
  *) echo "paper_recipe.sh: unknown SETTING '$SETTING' (qwen3-0.6b-math | qwen3-1.7b-math | qwen3-4b-dapo)" >&2; exit 2 ;;
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

DATA_DIR="$(realpath -m "${DATA_DIR:-data/math}")"
NAME="${SETTING}_${ALGO}"  # one run name per algorithm: resume_mode=auto never picks another run's checkpoint
for f in "$DATA_DIR/$TRAIN.parquet" "$DATA_DIR/math500.parquet"; do
  if [ ! -f "$f" ] && [ "${DRY_RUN:-0}" != 1 ]; then
    echo "paper_recipe.sh: $f not found. Fix: python scripts/prepare_data.py --out-dir $DATA_DIR" >&2; exit 2
  fi
done

ARGS=(
  algorithm="$ALGO"
  actor_rollout_ref.model.path="$STUDENT"
  distillation.teacher_models.teacher_model.model_path="${TEACHER:-Qwen/Qwen3-8B}"
  data.train_files="$DATA_DIR/$TRAIN.parquet"
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
  trainer.logger='[console,file,tensorboard]'
  trainer.val_before_train=true
  trainer.test_freq=25
  trainer.save_freq=50
  trainer.default_local_dir="$(realpath -m "${CKPT_DIR:-checkpoints/verl-eopd/$NAME}")"
  trainer.max_actor_ckpt_to_keep=2
)
if [ "${DRY_RUN:-0}" = 1 ]; then
  exec "$PY" -m verl_eopd.main "${ARGS[@]}" "$@" --cfg job
fi
exec "$PY" -m verl_eopd.main "${ARGS[@]}" "$@"
