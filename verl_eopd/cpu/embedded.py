"""The embedded tiny pairs: a teacher and a smaller student on a synthetic task, shipped with the package.

`python -m verl_eopd.main algorithm=eopd` with no model given runs EOPD on a pair, so the whole loop runs on
a laptop CPU or in CI with no hub access. Two tasks, each with its own pair, built once by `build_pair`
(scripts/build_pair.py) and shipped as package data in `pairs/<version>/` (weights, tokenizers, data splits,
pair.json with the held-out accuracies): SFT on another machine would give other weights (float reductions
differ across CPUs and thread counts), so every machine trains the same shipped student from the same shipped
teacher. `EOPD_PAIR_DIR` names a rebuilt pair instead; `EOPD_EMBEDDED_TASK` picks the task (default `add`):

  add (tiny-v5)  "What is a plus b?", one correct answer. The teacher (Qwen3 hidden 64, 2 layers) adds well
                 (98.1% greedy on held-out sums, shipped pair); its entropy is near zero on the digits and about ln 3
                 on the phrasing choice, so the gate never opens on the tokens that decide correctness. tiny-v5 is
                 tiny-v4's teacher and data with a student fine-tuned 650 steps instead of 600 (16.1% against
                 19.7% greedy). In the default run's 60 steps tiny-v4's student gained +21.3 points on average
                 over 16 run seeds, tiny-v5's +35.6 over 8 (docs/cpu.md). The plain-loop studies whose results
                 are committed (mini_repro, the preregistered runs, the coefficient sweep) keep tiny-v4
                 (`STUDIED`)
  multiple       "Name a multiple of d between a and b." (d in 6..9, 3 to 5 correct answers), the task where
  (tiny-multiple-v1)  the teacher is uncertain on the deciding tokens: it was taught every correct answer
                 equally, so its entropy on the first digit of the answer (or of the quotient) is above
                 tau = 0.8 on most problems; Pass@k rewards a student that keeps the alternatives. Teacher
                 Qwen3 hidden 64, 3 layers (98.3% greedy on held-out problems, shipped pair)

  tokenizer   byte-level BPE trained on the task's text, digits split one per token (as Qwen's), ChatML
              template, specials <|endoftext|> <|im_start|> <|im_end|> (ids 0, 1, 2)
  teacher     fine-tuned to answer in one of three phrasings and to end with <|im_end|> (a chat model)
  student     Qwen3 (hidden 32, 2 layers), fine-tuned briefly on the same text ending with <|endoftext|>
              (a "Base" model: a different end token, as Qwen3-Base vs Qwen3 chat, exercising the EOS remap);
              it knows the answer formats and is poor at the task (shipped pairs, greedy: add 16.1% (tiny-v4: 19.7%);
              multiple 6.7%)
  data        train/val parquet in verl's RL format: chat `prompt`, `data_source` (the task), `reward_model.
              ground_truth` (the sum; "d (a, b)" for a multiple), 90/10 split with a fixed seed

Mixing both tasks into one pair was tried and rejected: a teacher fine-tuned on both (2 or 3 layers) made
on-policy distillation lower the student's addition accuracy within the 60-step budget (docs/cpu.md).
The fine-tuning is a plain PyTorch loop (next-token loss on the responses). `compute_score` is the tasks'
verifiable reward (verl's custom-reward signature), also used for `eopd_grpo`.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ADD, MULTIPLE = "eopd_tiny_add", "eopd_tiny_multiple"  # the tasks (each is also verl's data_source)
VERSIONS = {ADD: "tiny-v5", MULTIPLE: "tiny-multiple-v1"}  # each task's default pair (a folder of pairs/)
STUDIED = {ADD: "tiny-v4", MULTIPLE: "tiny-multiple-v1"}  # the pairs of the plain-loop studies' committed results
DATA_SOURCE = ADD
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
ADD_PHRASINGS = ("The answer is {s}.", "It is {s}.", "{a} + {b} = {s}.")
MULTIPLE_PHRASINGS = ("The answer is {n}.", "It is {n}.", "{d} x {q} = {n}.")
MAX_OPERAND = 60
DIVISORS = (6, 7, 8, 9)
MULTIPLE_STARTS = range(0, 90)  # a; b = a + width, width such that 3 to 5 multiples of d lie strictly between
N_MULTIPLE = 1200  # problems drawn (fixed seed) from all (d, a, b)


TASK_ENV = "EOPD_EMBEDDED_TASK"  # which pair `python -m verl_eopd.main` uses when no model is given


def selected_task() -> str:
    """The task named by $EOPD_EMBEDDED_TASK (`add` or `multiple`, or the full data_source name); `add` unset."""
    value = os.environ.get(TASK_ENV, "add").strip()
    for task in VERSIONS:
        if value in (task, task.rsplit("_", 1)[-1]):
            return task
    raise ValueError(f"{TASK_ENV}={value!r} names no embedded task; fix: {TASK_ENV}=add (sums, the default) or "
                     f"{TASK_ENV}=multiple (name a multiple of d between a and b)")


SHIPPED = Path(__file__).parent / "pairs"  # the pairs shipped with the package: pairs/<version>/
PAIR_ENV = "EOPD_PAIR_DIR"  # a folder written by build_pair, used instead of the shipped pair


# ------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Problem:
    """One problem of the embedded tasks (`source` is verl's data_source, which also picks the reward rule).

    add       "What is a plus b?": one correct answer, a + b (0 <= a, b < MAX_OPERAND)
    multiple  "Name a multiple of 7 between a and b.": every n with n % 7 == 0 and a < n < b is correct (3 to 5
              of them); the teacher was taught all of them equally, so it is uncertain on the very tokens
              that decide correctness, where EOPD's gate opens
    """

    source: str
    a: int
    b: int
    d: int = 0  # the divisor of a `multiple` problem

    def question(self) -> str:
        if self.source == MULTIPLE:
            return f"Name a multiple of {self.d} between {self.a} and {self.b}."
        return f"What is {self.a} plus {self.b}?"

    def ground_truth(self) -> str:
        """verl's `reward_model.ground_truth`: the sum, or "d (a, b)" for a multiple of d in the open interval."""
        return f"{self.d} ({self.a}, {self.b})" if self.source == MULTIPLE else str(self.a + self.b)

    def answers(self) -> list[int]:
        """Every correct final number."""
        if self.source == MULTIPLE:
            return [n for n in range(self.a + 1, self.b) if n % self.d == 0]
        return [self.a + self.b]

    def response(self, rng: random.Random) -> str:
        """A correct response in one of the task's phrasings (uniform over phrasings and correct answers)."""
        if self.source == MULTIPLE:
            n = rng.choice(self.answers())
            return rng.choice(MULTIPLE_PHRASINGS).format(n=n, q=n // self.d, d=self.d)
        return rng.choice(ADD_PHRASINGS).format(a=self.a, b=self.b, s=self.a + self.b)


def _known(task: str) -> str:
    if task not in VERSIONS:
        raise ValueError(f"unknown embedded task {task!r}; choose one of {sorted(VERSIONS)}")
    return task


def task_problems(task: str = ADD, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Every problem of the task, split 90/10 into train/val (fixed seed)."""
    if _known(task) == ADD:
        problems = [Problem(ADD, a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    else:  # MULTIPLE
        every = [Problem(MULTIPLE, a, a + w, d) for d in DIVISORS for a in MULTIPLE_STARTS
                 for w in range(3 * d + 1, 5 * d + 1)]
        problems = random.Random(seed).sample([p for p in every if 3 <= len(p.answers()) <= 5], N_MULTIPLE)
    random.Random(seed).shuffle(problems)
    n_val = len(problems) // 10
    return problems[n_val:], problems[:n_val]


def tokenizer_corpus(task: str) -> list[str]:
    """The text the task's tokenizer is trained on."""
    if task == ADD:
        return [f"What is {a} plus {b}? " + p.format(a=a, b=b, s=a + b) + " user assistant"
                for a in range(MAX_OPERAND) for b in range(0, MAX_OPERAND, 3) for p in ADD_PHRASINGS]
    rng = random.Random(0)
    train, val = task_problems(task)
    return [p.question() + " " + p.response(rng) + " user assistant" for p in train + val for _ in range(2)]


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """verl's custom-reward signature. The response's last integer n is the answer: for `eopd_tiny_multiple`
    1.0 when n is a multiple of 7 inside the open interval "(a, b)" of ground_truth, otherwise 1.0 when n
    equals ground_truth; else 0.0."""
    numbers = re.findall(r"-?\d+", solution_str or "")
    if not numbers:
        return 0.0
    if data_source == MULTIPLE:
        d, a, b = (int(x) for x in re.findall(r"-?\d+", str(ground_truth)))
        n = int(numbers[-1])
        return 1.0 if n % d == 0 and a < n < b else 0.0
    return 1.0 if numbers[-1] == str(ground_truth).strip() else 0.0


def write_rl_parquet(problems: list[Problem], path: Path, split: str) -> None:
    import pandas as pd

    rows = [{
        "data_source": p.source,
        "prompt": [{"role": "user", "content": p.question()}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": p.ground_truth()},
        "extra_info": {"split": split, "index": i, "a": p.a, "b": p.b, "d": p.d},
    } for i, p in enumerate(problems)]
    pd.DataFrame(rows).to_parquet(path)


# ------------------------------------------------------------------------------------------------ models


def build_tokenizer(out_dir: str, *, eos_token: str = "<|im_end|>", vocab_size: int = 400, task: str = ADD):
    """Byte-level BPE trained on the task's text; saved with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = tokenizer_corpus(task)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def build_tiny_qwen3(out_dir: str, tokenizer, *, vocab_size: Optional[int] = None, hidden: int = 32, layers: int = 2,
                     seed: int = 0, logit_scale: float = 1.0):
    """A random Qwen3ForCausalLM saved with `tokenizer`; vocab_size may exceed the tokenizer (padded table)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    cfg = AutoConfig.for_model(
        "qwen3", vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(out_dir)
    return model


def _sft_examples(tokenizer, problems: list[Problem], rng: random.Random, end_token: str) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for each problem with a random correct response, ending with end_token."""
    out = []
    for p in problems:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p.question()}], tokenize=False,
                                               add_generation_prompt=True)
        answer = p.response(rng) + end_token
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((p_ids + r_ids, len(p_ids)))
    return out


def sft(model_dir: str, tokenizer, problems: list[Problem], *, end_token: str, steps: int, lr: float, batch: int = 32, seed: int = 0,
        log_every: int = 0) -> list[float]:
    """Plain next-token fine-tuning on the responses (prompt tokens masked); saves the model in place."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for step in range(steps):
        examples = _sft_examples(tokenizer, rng.sample(problems, batch), rng, end_token)
        L = max(len(ids) for ids, _ in examples)
        ids = torch.full((batch, L), pad)
        labels = torch.full((batch, L), -100)
        mask = torch.zeros(batch, L, dtype=torch.long)
        for i, (seq, p_len) in enumerate(examples):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, p_len: len(seq)] = torch.tensor(seq[p_len:])
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"[verl_eopd.cpu.embedded] sft {Path(model_dir).name} step {step + 1}/{steps} loss {loss.item():.3f}",
                  flush=True)
    model.save_pretrained(model_dir)
    return losses


@dataclass(frozen=True)
class Recipe:
    """How a task's pair is built: teacher size and fine-tuning steps (batch 32, lr 3e-3, cosine); the student
    is always Qwen3 hidden 32, 2 layers."""

    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    student_steps: int


RECIPES = {ADD: Recipe(64, 2, 1200, 600), MULTIPLE: Recipe(64, 3, 3000, 150)}  # tiny-v4, tiny-multiple-v1


PAIR_FILE = "pair.json"  # what a pair folder holds: paths (relative to the folder), recipe, measured figures


def shipped_dir(task: str = ADD, studied: bool = False) -> Path:
    """The pair shipped with the package for `task` (package data, built once by `build_pair`): the default
    run's, or with `studied` the one the plain-loop studies' committed results were made on."""
    return SHIPPED / (STUDIED if studied else VERSIONS)[_known(task)]


def load_pair(root: Path) -> dict:
    """The pair in `root` (a folder written by `build_pair`): its pair.json with absolute paths."""
    root = Path(root)
    record = root / PAIR_FILE
    if not record.is_file():
        raise FileNotFoundError(f"{root} holds no embedded pair ({PAIR_FILE} missing). Fix: unset {PAIR_ENV} to use "
                                f"the shipped pair, or build one: python scripts/build_pair.py --out {root}")
    info = json.loads(record.read_text())
    for key in ("teacher", "student", "train", "val"):
        info[key] = str((root / info[key]).resolve())  # an absolute entry stays as it is
    info["root"] = str(root.resolve())
    return info


def embedded_pair(task: str = ADD, studied: bool = False) -> dict:
    """The pair a run on the embedded default uses: the folder named by $EOPD_PAIR_DIR (one `build_pair`
    wrote, for a rebuilt or another pair) or else the pair shipped with the package (`studied`: the plain-loop
    studies' pair, `shipped_dir`). Nothing is built: every machine trains the same student from the same
    teacher."""
    chosen = os.environ.get(PAIR_ENV)
    info = load_pair(Path(chosen) if chosen else shipped_dir(task, studied))
    if info.get("task", ADD) != _known(task):
        raise ValueError(f"{PAIR_ENV}={chosen} holds a pair for task {info.get('task')!r}, not {task!r}. Fix: "
                         f"point {PAIR_ENV} at a {task} pair, or set {TASK_ENV} to its task")
    return info


def build_pair(root: Path, *, task: str = ADD, teacher_steps: Optional[int] = None,
               student_steps: Optional[int] = None, teacher_from: Optional[Path] = None,
               measure: Optional[Callable[[str, dict], float]] = None, verbose: bool = True) -> dict:
    """Build the task's tiny pair into `root` (the documented way to rebuild the shipped pairs; about 1-3 min on
    2 cores) and record it in root/pair.json with the held-out greedy accuracies of both models.

    `teacher_from`: a pair folder whose teacher and data are reused, named in pair.json relative to `root`
    (only the student is fine-tuned here: tiny-v5, `--student-steps 650 --teacher-from pairs/tiny-v4`; the
    end-to-end tests' weakly fine-tuned student). pair.json's `version` is the folder's name.
    `measure(model_dir, info)`: the held-out greedy accuracy (verl_eopd.math.loop.held_out_accuracy;
    scripts/build_pair.py passes it), recorded for both models. SFT on another machine gives other weights (float
    reductions differ across CPUs and thread counts), which is why the package ships the pairs instead of building
    them.
    """
    import torch
    import transformers

    recipe = RECIPES[_known(task)]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if verbose:
        print(f"[verl_eopd.cpu.embedded] building the tiny {task} pair in {root}", flush=True)
    train, val = task_problems(task)
    log = 100 if verbose else 0
    record = {"task": task, "version": root.name, "student": "student",
              "built_with": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": threads}}
    if teacher_from is None:
        record.update(teacher="teacher", train="train.parquet", val="val.parquet")
        chat_tok = build_tokenizer(str(root / "teacher"), eos_token="<|im_end|>", task=task)
        build_tiny_qwen3(str(root / "teacher"), chat_tok, hidden=recipe.teacher_hidden, layers=recipe.teacher_layers,
                         seed=1)
        t_losses = sft(str(root / "teacher"), chat_tok, train, end_token="<|im_end|>",
                       steps=teacher_steps or recipe.teacher_steps, lr=3e-3, seed=1, log_every=log)
        record["teacher_final_sft_loss"] = t_losses[-1]
        write_rl_parquet(train, root / "train.parquet", "train")
        write_rl_parquet(val, root / "val.parquet", "val")
    else:
        source = load_pair(Path(teacher_from))  # its paths relative to this folder: pairs/ ships both
        record.update({k: os.path.relpath(source[k], root.resolve()) for k in ("teacher", "train", "val")})
    base_tok = build_tokenizer(str(root / "student"), eos_token="<|endoftext|>", task=task)
    build_tiny_qwen3(str(root / "student"), base_tok, hidden=32, layers=2, seed=2)
    s_losses = sft(str(root / "student"), base_tok, train, end_token="<|endoftext|>",
                   steps=student_steps or recipe.student_steps, lr=3e-3, seed=2, log_every=log)
    record.update(student_final_sft_loss=s_losses[-1], student_steps=student_steps or recipe.student_steps)
    torch.set_num_threads(threads)
    (root / PAIR_FILE).write_text(json.dumps(record, indent=1))
    info = load_pair(root)
    if measure is not None:
        record["held_out_greedy"] = {who: measure(info[who], info) for who in ("teacher", "student")}
        (root / PAIR_FILE).write_text(json.dumps(record, indent=1))
    if verbose and measure is not None:
        print(f"[verl_eopd.cpu.embedded] held-out greedy accuracy: {record['held_out_greedy']}", flush=True)
    return load_pair(root)


STEPS = 60  # rollout batches of the default run
VAL_EVERY = 20  # verl's validation on the whole held-out split: before training, every VAL_EVERY steps, at the end


def default_rollout_backend() -> str:
    """`vllm` when it is importable (verl's default backend), else this package's `hf` backend: the embedded
    default must generate on any machine, with or without a GPU or vLLM."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def embedded_settings(info: dict, algorithm: str, ranks: int = 1, per_node: Optional[int] = None) -> dict:
    """verl config values for a run on the embedded pair (each applied unless the user set that key).

    Sized so that the run visibly distils within 15 minutes on a 2-core CPU (docs/cpu.md): 512 responses per
    rollout batch, all in one PPO mini-batch (~5k tokens per update) and 4 PPO epochs over it, AdamW lr 1e-3
    (verl's weight decay 0.01 and clipping 1.0). The reverse-KL term is a one-sample estimate per token: with
    the paper's sequence counts on ~10-token answers (16 responses per update) its gradient is mostly noise
    (../shared notes measured a cosine of -0.21 to the exact gradient); thousands of tokens per update move
    held-out accuracy within tens of steps. verl's per-sample cost on CPU (~10 ms of agent-loop work per
    response) makes reusing each batch for several epochs cheaper than sampling more. verl validates greedily
    on the whole held-out split (360 problems never trained on) before training and every VAL_EVERY steps.

    `ranks` (trainer.n_gpus_per_node x trainer.nnodes when the user set them, else 1). The micro-batch sizes are
    not set here: `integration.config.fitted_micro_batches` derives them from the composed batch sizes and ranks
    (512 / ranks responses per rank with these defaults, cut into micro-batches of at most 256).
    """
    grpo, backend = algorithm == "eopd_grpo", default_rollout_backend()
    return {
        "actor_rollout_ref.model.path": info["student"],
        "distillation.teacher_models.teacher_model.model_path": info["teacher"],
        # a tiny model: one rank on one node unless asked (verl's default is 8 GPUs)
        "trainer.n_gpus_per_node": per_node or ranks,
        "trainer.nnodes": 1,
        "actor_rollout_ref.rollout.name": backend,
        # one GPU per rollout replica (verl's default 2 would not tile one rank: its workers assert it)
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "data.train_files": info["train"],
        "data.val_files": info["val"],
        "data.prompt_key": "prompt",
        "data.max_prompt_length": 32,
        "data.max_response_length": 16,
        "data.train_batch_size": 128 if grpo else 512,  # prompts; x rollout.n responses
        "data.val_max_samples": -1,
        "actor_rollout_ref.rollout.n": 4 if grpo else 1,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 128 if grpo else 512,  # prompts per optimizer step
        "actor_rollout_ref.actor.ppo_epochs": 4,
        # hf backend (CPU): old log-probs = the rollout's own log-probs of the sampled tokens (verl's bypass mode;
        # the same fp32 student at temperature 1), which saves verl's separate old-log-prob pass (~10% of a step)
        "algorithm.rollout_correction.bypass_mode": backend == "hf",
        "actor_rollout_ref.actor.optim.lr": 1e-3,
        "actor_rollout_ref.actor.optim.lr_scheduler_type": "constant",  # the presets' cosine is for real runs
        "actor_rollout_ref.model.enable_gradient_checkpointing": False,
        "actor_rollout_ref.rollout.val_kwargs.temperature": 0.0,
        "actor_rollout_ref.rollout.val_kwargs.do_sample": False,
        "reward.custom_reward_function.path": "pkg://verl_eopd.cpu.embedded",
        "reward.custom_reward_function.name": "compute_score",
        "trainer.total_training_steps": STEPS,
        # steps, not epochs, bound the run (3,240 prompts are 6 batches of 512: the presets' 3 epochs would stop
        # it at step 18, before its last validation)
        "trainer.total_epochs": 1000,
        "trainer.logger": ["console", "file"],
        "trainer.project_name": "verl-eopd",  # not "verl_eopd": a ./verl_eopd log folder would shadow the package
        "trainer.experiment_name": ("tiny_" if info.get("task", ADD) == ADD else "tiny_multiple_") + algorithm,
        "trainer.val_before_train": True,
        "trainer.test_freq": VAL_EVERY,
        "trainer.save_freq": STEPS,
    }

