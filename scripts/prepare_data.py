"""Write the paper's math datasets as verl RL parquet (see verl_eopd/math/data.py for the schemas).

    python scripts/prepare_data.py --out-dir data/math                     # MATH, DAPO, six benchmarks
    python scripts/prepare_data.py --out-dir data/math --datasets deepmath  # DeepMath-103K (~2.1 GB download)
    python scripts/prepare_data.py --out-dir data/math --datasets deepmath --source deepmath=/data/deepmath/
    python scripts/prepare_data.py --out-dir data/math --datasets math_train math500 aime24
    python scripts/prepare_data.py --out-dir data/math --datasets aime25 --source aime25=/data/aime25.jsonl

Sources default to the Hugging Face ids in verl_eopd.math.data.DATASETS; `--source NAME=ID_OR_PATH` reads another
id or a local json/jsonl/parquet file or folder in the same schema. Dropped rows are counted per reason,
printed and stored in <out-dir>/prepare_report.json.
"""

from __future__ import annotations

import argparse
import sys

from verl_eopd.math.data import DATASETS, DEFAULT_SETS, EVAL_INSTRUCTION, TRAIN_INSTRUCTION, prepare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_SETS), choices=list(DATASETS), metavar="NAME",
                   help=f"any of {', '.join(DATASETS)}; default: {', '.join(DEFAULT_SETS)}")
    p.add_argument("--source", action="append", default=[], metavar="NAME=ID_OR_PATH")
    p.add_argument("--max-rows", type=int, default=None, help="keep the first N rows of each (smoke tests)")
    p.add_argument("--train-instruction", default=TRAIN_INSTRUCTION)
    p.add_argument("--eval-instruction", default=EVAL_INSTRUCTION)
    args = p.parse_args(argv)
    sources: dict[str, str] = {}
    for item in args.source:
        name, sep, value = item.partition("=")
        if not sep or not value:
            p.error(f"--source {item!r}: expected NAME=ID_OR_PATH")
        if name not in DATASETS:
            p.error(f"--source {item!r}: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        sources[name] = value
    missing = [name for name in sources if name not in args.datasets]
    if missing:  # a source for a dataset that is not written would be ignored
        p.error(f"--source {missing[0]}=...: {missing[0]} is not among --datasets ({' '.join(args.datasets)}). "
                f"Fix: --datasets {' '.join(missing)}")
    prepare(args.datasets, args.out_dir, sources=sources, train_instruction=args.train_instruction,
            eval_instruction=args.eval_instruction, max_rows=args.max_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
