"""Rebuild an embedded tiny pair (the package ships one per task in verl_eopd/cpu/pairs/; every machine then
trains the same student from the same teacher). Writes OUT/pair.json with the held-out greedy accuracies.

    python scripts/build_pair.py --task add --out /tmp/pair          # then EOPD_PAIR_DIR=/tmp/pair bash scripts/run.sh
    python scripts/build_pair.py --task add --out verl_eopd/cpu/pairs/tiny-v4   # refresh the studies' sum pair
    python scripts/build_pair.py --task add --student-steps 650 --teacher-from verl_eopd/cpu/pairs/tiny-v4 \
        --out verl_eopd/cpu/pairs/tiny-v5                                        # refresh the default run's pair
    python scripts/build_pair.py --task add --student-steps 60 --teacher-from verl_eopd/cpu/pairs/tiny-v4 --out DIR
"""

import argparse
from pathlib import Path

from verl_eopd.cpu import embedded
from verl_eopd.math.loop import held_out_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="add", help="add or multiple")
    parser.add_argument("--out", required=True, help="folder to write: pair.json, teacher/, student/, the parquet splits")
    parser.add_argument("--student-steps", type=int, default=None, help="student SFT steps (default: the recipe's)")
    parser.add_argument("--teacher-from", default=None, help="reuse this pair folder's teacher and data")
    args = parser.parse_args()
    task = next((t for t in embedded.VERSIONS if args.task in (t, t.rsplit("_", 1)[-1])), args.task)
    embedded.build_pair(Path(args.out), task=task, student_steps=args.student_steps,
                        teacher_from=Path(args.teacher_from) if args.teacher_from else None, measure=held_out_accuracy)


if __name__ == "__main__":
    main()
