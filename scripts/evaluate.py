"""Avg@n / Pass@k of a model on prepared math benchmarks (the paper's protocol by default).

    python scripts/evaluate.py --model checkpoints/verl-eopd/RUN/hf/global_step_N --data-dir data/math \
        --output-dir eval/eopd_1.7b --pass-k 1,8
    python scripts/evaluate.py --model M --benchmarks math500=data/math/math500.parquet --n 16 --pass-k 1,8,16

--model is a Hugging Face folder with weights: after a verl run, the folder the end-of-run summary's merge
command writes (`python -m verl.model_merger merge --backend fsdp --local_dir .../global_step_N/actor
--target_dir .../hf/global_step_N`); a checkpoint folder is refused with that command. Defaults: n = 8 samples
per problem (or the largest --pass-k), temperature 1.0, top-p 0.8, 8192 new tokens, all six paper benchmarks
found in --data-dir. vLLM is used when importable (--backend vllm/hf to choose); on a GPU node one engine per
GPU (data parallel) when the weights fit one GPU, else tensor-parallel groups (--tensor-parallel-size,
--data-parallel-size override). Progress goes to stderr; rerunning the same command resumes from
<output-dir>/samples.jsonl. Prints and writes results.md (the paper's table: one row per benchmark and their
mean; columns Avg@n and each Pass@k) and summary.json (Pass@1..n).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verl_eopd.math.eval import (PAPER_BENCHMARKS, EvalSettings, build_generator, check_model, check_resume,
                                 markdown_table, parse_pass_k, run_eval)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="Hugging Face model folder with weights (the merge command's --target_dir) or hub id")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data-dir", help="folder of scripts/prepare_data.py output; takes the six benchmarks in it")
    p.add_argument("--benchmarks", nargs="+", default=[], metavar="NAME=PARQUET")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default: 8, or the largest --pass-k)")
    p.add_argument("--k", type=int, default=None, help="old name of --n (samples per problem)")
    p.add_argument("--pass-k", default=None, metavar="K1,K2,...",
                   help="Pass@k columns, e.g. 1,8,16 (each k <= --n; default: k = n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--box-required", action="store_true",
                   help="score unboxed responses 0 (default: fall back to 'answer is' / last number, as Qwen2.5-Math)")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                   help="pass enable_thinking to the chat template (Qwen3 chat teachers: false)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="GPUs per engine (default: 1 when the weights fit one GPU, else the smallest power of 2 that fits)")
    p.add_argument("--data-parallel-size", type=int, default=None,
                   help="engines, one process each (default: visible GPUs // tensor-parallel size; on CPU 1)")
    p.add_argument("--batch-size", type=int, default=64, help="HF backend: sequences per generate call")
    p.add_argument("--chunk", type=int, default=64, help="problems per engine per generate call between saves")
    p.add_argument("--max-problems", type=int, default=None, help="first N problems of each benchmark")
    args = p.parse_args(argv)

    if args.n is not None and args.k is not None and args.n != args.k:
        p.error(f"--n {args.n} and --k {args.k} disagree (--k is the old name of --n): give one")
    n = args.n if args.n is not None else args.k
    try:
        if n is None:  # the largest k asked for, else the paper's 8
            n = max(parse_pass_k(args.pass_k, 10**9)) if args.pass_k else 8
        ks = parse_pass_k(args.pass_k, n) if args.pass_k else [n]
    except ValueError as e:
        p.error(str(e))
    if args.backend == "hf" and (args.tensor_parallel_size or 1) > 1:
        p.error(f"--tensor-parallel-size={args.tensor_parallel_size} with --backend hf: the HF backend runs one "
                "device per engine. Fix: --backend vllm, or --data-parallel-size for more engines")
    try:
        check_model(args.model)
    except FileNotFoundError as e:
        p.error(str(e))

    benchmarks = {}
    if args.data_dir:
        for name in PAPER_BENCHMARKS:
            path = Path(args.data_dir) / f"{name}.parquet"
            if path.exists():
                benchmarks[name] = str(path)
    for item in args.benchmarks:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).exists():
            p.error(f"--benchmarks {item!r}: expected NAME=PARQUET with an existing file")
        benchmarks[name] = path
    if not benchmarks:
        p.error("no benchmarks: give --data-dir with prepared parquet files or --benchmarks NAME=PARQUET")
    kwargs = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
    settings = EvalSettings(model=args.model, k=n, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, box_required=args.box_required,
                            chat_template_kwargs=kwargs)
    try:
        settings.check()  # before the model loads
    except ValueError as e:
        p.error(str(e).replace("--k=", "--n="))
    check_resume(args.output_dir, settings)
    generator = build_generator(args.model, args.backend, tensor_parallel_size=args.tensor_parallel_size,
                                data_parallel_size=args.data_parallel_size, batch_size=args.batch_size)
    try:
        summary = run_eval(benchmarks, args.output_dir, settings, generator,
                           chunk=args.chunk * getattr(generator, "engines", 1), max_problems=args.max_problems, ks=ks)
    finally:
        if hasattr(generator, "close"):
            generator.close()
    print(markdown_table(summary, ks))
    print(json.dumps({b: {k: round(v, 2) for k, v in s.items()} for b, s in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
