"""Avg@k / Pass@k of a model on prepared math benchmarks (the paper's protocol by default).

    python scripts/evaluate.py --model ckpts/actor_hf --data-dir data/math --output-dir eval/eopd_1.7b
    python scripts/evaluate.py --model M --benchmarks math500=data/math/math500.parquet --k 8 --max-tokens 8192

Defaults: k = 8 samples, temperature 1.0, top-p 0.8, 8192 new tokens, all six paper benchmarks found in
--data-dir. vLLM is used when importable (--backend vllm/hf to choose). Progress goes to stderr; rerunning
the same command resumes from <output-dir>/samples.jsonl. Writes results.md (the paper's table layout:
Avg@k / Pass@k per benchmark and their mean) and summary.json (also Pass@1..k).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verl_eopd.math.eval import PAPER_BENCHMARKS, EvalSettings, check_resume, make_generator, markdown_table, run_eval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder or id (e.g. a checkpoint's huggingface/ folder)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data-dir", help="folder of scripts/prepare_data.py output; takes the six benchmarks in it")
    p.add_argument("--benchmarks", nargs="+", default=[], metavar="NAME=PARQUET")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--box-required", action="store_true",
                   help="score unboxed responses 0 (default: fall back to 'answer is' / last number, as Qwen2.5-Math)")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                   help="pass enable_thinking to the chat template (Qwen3 chat teachers: false)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="HF backend: sequences per generate call")
    p.add_argument("--chunk", type=int, default=64, help="problems per generate call between saves")
    p.add_argument("--max-problems", type=int, default=None, help="first N problems of each benchmark")
    args = p.parse_args(argv)

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
    settings = EvalSettings(model=args.model, k=args.k, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, box_required=args.box_required,
                            chat_template_kwargs=kwargs)
    settings.check()  # before the model loads
    check_resume(args.output_dir, settings)
    generator = make_generator(args.model, args.backend, tensor_parallel_size=args.tensor_parallel_size,
                               batch_size=args.batch_size)
    summary = run_eval(benchmarks, args.output_dir, settings, generator, chunk=args.chunk,
                       max_problems=args.max_problems)
    print(markdown_table(summary))
    print(json.dumps({b: {k: round(v, 2) for k, v in s.items()} for b, s in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
