#!/usr/bin/env bash
# The paper's training settings (arXiv 2603.07079, Sec. 5.1 / App. A) as one launcher.
#
#   bash scripts/paper_recipe.sh SETTING ALGO [extra hydra overrides...]
#     SETTING  qwen3-0.6b-math | qwen3-1.7b-math | qwen3-4b-dapo
#     ALGO     opd | eopd | eopd_grpo
#
# Environment (defaults in brackets):
#   DATA_DIR [data/math]          output of scripts/prepare_data.py
#   TEACHER  [Qwen/Qwen3-8B]      chat teacher, scored without thinking (enable_thinking=false)
#   NNODES [1]  GPUS_PER_NODE [8] one node, or a Ray cluster (start it first, see docs/recipes.md)
#   ROLLOUT_TP [1]                vLLM tensor parallel size of the student rollout
#   CKPT_DIR [checkpoints/verl-eopd/<name>]
#   DRY_RUN=1                     print the composed config instead of training
#
# Paper hyperparameters: 128 prompts per step, 1 rollout per prompt at T = 1.0, top-p 1.0, responses up to
# 4096 tokens, PPO mini-batch 32 (4 optimizer steps per iteration), AdamW lr 3e-6 with cosine decay to 0 and
# no warmup, weight decay 0.01, grad clip 1.0, no entropy bonus, no KL-to-reference; EOPD tau = 0.8,
# alpha = 1.0, k = 16, clip 0.2. MATH: 3 epochs; DAPO-Math-17k (en): 2 epochs. eopd_grpo (not in the paper):
# the same with 8 rollouts per prompt and GRPO on the math reward plus the EOPD term.
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING="${1:?usage: paper_recipe.sh SETTING ALGO [overrides]}"
ALGO="${2:?usage: paper_recipe.sh SETTING ALGO [overrides]}"
shift 2

case "$SETTING" in
  qwen3-0.6b-math) STUDENT=Qwen/Qwen3-0.6B-Base; TRAIN=math_train; EPOCHS=3 ;;
  qwen3-1.7b-math) STUDENT=Qwen/Qwen3-1.7B-Base; TRAIN=math_train; EPOCHS=3 ;;
  qwen3-4b-dapo)   STUDENT=Qwen/Qwen3-4B-Base;   TRAIN=dapo_math;  EPOCHS=2 ;;
  *) echo "paper_recipe.sh: unknown SETTING '$SETTING' (qwen3-0.6b-math | qwen3-1.7b-math | qwen3-4b-dapo)" >&2; exit 2 ;;
esac
case "$ALGO" in
  opd|eopd) N=1 ;;
  eopd_grpo) N=8 ;;
  *) echo "paper_recipe.sh: unknown ALGO '$ALGO' (opd | eopd | eopd_grpo)" >&2; exit 2 ;;
esac

DATA_DIR="${DATA_DIR:-data/math}"
NAME="${SETTING}_${ALGO}"
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
  data.train_batch_size=128
  data.max_prompt_length=1024
  data.max_response_length=4096
  data.filter_overlong_prompts=true
  +data.apply_chat_template_kwargs.enable_thinking=false
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.n=$N
  actor_rollout_ref.rollout.temperature=1.0
  actor_rollout_ref.rollout.top_p=1.0
  actor_rollout_ref.rollout.tensor_model_parallel_size="${ROLLOUT_TP:-1}"
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.val_kwargs.do_sample=false
  actor_rollout_ref.actor.ppo_mini_batch_size=32
  actor_rollout_ref.actor.ppo_epochs=1
  actor_rollout_ref.actor.use_dynamic_bsz=true
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
  actor_rollout_ref.actor.optim.lr=3e-6
  actor_rollout_ref.actor.optim.lr_scheduler_type=cosine
  actor_rollout_ref.actor.optim.min_lr_ratio=0.0
  actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0
  actor_rollout_ref.actor.optim.weight_decay=0.01
  actor_rollout_ref.actor.grad_clip=1.0
  actor_rollout_ref.model.enable_gradient_checkpointing=true
  actor_rollout_ref.ref.fsdp_config.param_offload=true
  trainer.total_epochs=$EPOCHS
  trainer.nnodes="${NNODES:-1}"
  trainer.n_gpus_per_node="${GPUS_PER_NODE:-8}"
  trainer.project_name=verl-eopd
  trainer.experiment_name="$NAME"
  trainer.logger='[console,tensorboard]'
  trainer.val_before_train=true
  trainer.test_freq=25
  trainer.save_freq=50
  trainer.default_local_dir="${CKPT_DIR:-checkpoints/verl-eopd/$NAME}"
)
if [ "${DRY_RUN:-0}" = 1 ]; then
  exec python -m verl_eopd.main "${ARGS[@]}" "$@" --cfg job
fi
exec python -m verl_eopd.main "${ARGS[@]}" "$@"
