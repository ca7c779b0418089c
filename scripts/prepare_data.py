"""Write the paper's math datasets as verl RL parquet (see verl_eopd/math/data.py for the schemas).

    python scripts/prepare_data.py --out-dir data/math                     # all: MATH, DAPO, six benchmarks
    python scripts/prepare_data.py --out-dir data/math --datasets math_train math500 aime24
    python scripts/prepare_data.py --out-dir data/math --datasets aime25 --source aime25=/data/aime25.jsonl

Sources default to the Hugging Face ids in verl_eopd.math.data.DATASETS; `--source NAME=ID_OR_PATH` reads another
id or a local json/jsonl/parquet file or folder in the same schema. Dropped rows are counted per reason,
printed and stored in <out-dir>/prepare_report.json.
"""

from __future__ import annotations

import argparse
import sys

from verl_eopd.math.data import DATASETS, EVAL_INSTRUCTION, TRAIN_INSTRUCTION, prepare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), metavar="NAME",
                   help=f"default: all of {', '.join(DATASETS)}")
    p.add_argument("--source", action="append", default=[], metavar="NAME=ID_OR_PATH")
    p.add_argument("--max-rows", type=int, default=None, help="keep the first N rows of each (smoke tests)")
    p.add_argument("--train-instruction", default=TRAIN_INSTRUCTION)
    p.add_argument("--eval-instruction", default=EVAL_INSTRUCTION)
    args = p.parse_args(argv)
    sources = {}
    for item in args.source:
        name, sep, value = item.partition("=")
        if not sep or not value:
            p.error(f"--source {item!r}: expected NAME=ID_OR_PATH")
        sources[name] = value
    prepare(args.datasets, args.out_dir, sources=sources, train_instruction=args.train_instruction,
            eval_instruction=args.eval_instruction, max_rows=args.max_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
