"""Math datasets -> verl RL parquet: the paper's training sets and its six evaluation benchmarks.

Each dataset is read from its Hugging Face id (with the config and split below) or from a local
json / jsonl / parquet file or folder in the same schema, and written as verl's RL format:

  data_source   the dataset's short name (`math500`, ...); the evaluation reports per data_source
  prompt        [{"role": "user", "content": problem + instruction}] (verl applies the chat template)
  ability       "math"
  reward_model  {"style": "rule", "ground_truth": answer string}  (scored by verl_eopd.math.reward)
  extra_info    {"split", "index", "source", "problem", and the row's level/type/subject/id when present}

Schemas (public dataset cards and the preprocessing code that reads them):

  name           source                                      config               split  problem    answer
  math_train     DigitalLearningGmbH/MATH-lighteval          default              train  problem    last \\boxed{} of `solution`
  dapo_math      open-r1/DAPO-Math-17k-Processed             en                   train  prompt     solution (the answer)
                 (or BytedTsinghua-SIA/DAPO-Math-17k: templated chat prompt, reward_model.ground_truth,
                 the 17,917 rows repeated 100 times; template stripped, deduplicated, English kept)
  deepmath       zwhe99/DeepMath-103K                        default              train  question   final_answer
                 (103,022 rows in 10 parquet shards; the other fields, difficulty (float) and topic, go to extra_info;
                 r1_solution_1..3, three R1 solutions, are not read: final_answer is the verifiable answer. Fields
                 as on the card of DeepMath-103K's copies (e.g. xiaoyuanliu/DeepMath-10K): question, final_answer,
                 difficulty, topic, r1_solution_1..3; trl-lib/DeepMath-103K's chat `prompt` + `solution` also reads)
  math500        HuggingFaceH4/MATH-500                      default              test   problem    answer
  amc23          math-ai/amc23                               -                    test   question   answer (numeric)
  minerva        math-ai/minervamath                         -                    test   question   answer
  olympiadbench  Hothan/OlympiadBench                        OE_TO_maths_en_COMP  train  question   final_answer (list)
  aime24         HuggingFaceH4/aime_2024                     -                    train  problem    answer
  aime25         math-ai/aime25                              -                    test   problem    answer

Mirrors with other column names work too: the problem is the first of problem/question/Problem/prompt
that is present, the answer the first of answer/Answer/final_answer/solution/reward_model.ground_truth
(a solution with a \\boxed{} gives its last box). Rows without a problem or an answer, duplicates, rows
in another language and duplicate problems with conflicting answers are dropped, counted per reason and
reported (`prepare_report.json`), never dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from .reward import last_boxed

# the authors' training prompt suffix, and the Qwen2.5-Math evaluation instruction the paper evaluates with
TRAIN_INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."
EVAL_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "solution", "Solution", "reward_model")
EXTRA_KEYS = ("level", "type", "subject", "unique_id", "id", "ID", "url", "year", "subfield", "answer_type", "unit",
              "difficulty", "topic")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str  # Hugging Face id
    config: Optional[str]
    split: str
    role: str  # "train" or "eval"
    problem_key: str
    answer_key: str
    dedupe: bool = False
    english_only: bool = False


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("math_train", "DigitalLearningGmbH/MATH-lighteval", "default", "train", "train", "problem", "solution"),
    DatasetSpec("dapo_math", "open-r1/DAPO-Math-17k-Processed", "en", "train", "train", "prompt", "solution",
                dedupe=True, english_only=True),
    DatasetSpec("deepmath", "zwhe99/DeepMath-103K", None, "train", "train", "question", "final_answer", dedupe=True),
    DatasetSpec("math500", "HuggingFaceH4/MATH-500", None, "test", "eval", "problem", "answer"),
    DatasetSpec("amc23", "math-ai/amc23", None, "test", "eval", "question", "answer"),
    DatasetSpec("minerva", "math-ai/minervamath", None, "test", "eval", "question", "answer"),
    DatasetSpec("olympiadbench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "eval", "question",
                "final_answer"),
    DatasetSpec("aime24", "HuggingFaceH4/aime_2024", None, "train", "eval", "problem", "answer"),
    DatasetSpec("aime25", "math-ai/aime25", None, "test", "eval", "problem", "answer"),
)}
TRAIN_SETS = tuple(n for n, s in DATASETS.items() if s.role == "train")
# what prepare_data.py writes when no --datasets is given: the paper's training sets and benchmarks (DeepMath-103K,
# about 2.1 GB with its R1 solutions, only when asked for)
DEFAULT_SETS = tuple(n for n in DATASETS if n != "deepmath")
EVAL_SETS = tuple(n for n, s in DATASETS.items() if s.role == "eval")


# ---------------------------------------------------------------------------------------------- reading


def read_rows(source: str, spec: DatasetSpec) -> list[dict]:
    """Rows of a local file/folder (json, jsonl, parquet) if `source` exists, else of the HF dataset."""
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet")) if path.is_dir() \
            else [path]
        if not files:
            raise FileNotFoundError(f"{source}: no .json/.jsonl/.parquet files in this folder")
        rows: list[dict] = []
        for f in files:
            rows.extend(_read_file(f))
        return rows
    if source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl", ".parquet")):
        raise FileNotFoundError(f"{source}: no such file (local paths must exist; Hugging Face ids look like org/name)")
    import datasets

    ds = datasets.load_dataset(source, spec.config, split=spec.split) if spec.config else \
        datasets.load_dataset(source, split=spec.split)
    return [dict(r) for r in ds]


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- conversion


def _plain(value: Any) -> Any:
    """numpy arrays/scalars (parquet) -> python lists/scalars."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def answer_text(value: Any, key: str) -> Optional[str]:
    """A clean ground-truth string from an answer field, or None if it holds no answer."""
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, dict):  # reward_model {"ground_truth": ...}
        return answer_text(value.get("ground_truth"), "ground_truth")
    if isinstance(value, (list, tuple)):
        parts = [a for a in (answer_text(v, key) for v in value) if a]
        return ", ".join(parts) if parts else None
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if key in ("solution", "Solution"):
        boxed = last_boxed(text)
        if boxed is not None:
            text = boxed
        elif len(text) > 100:  # a worked solution with no box: no answer in it
            return None
    text = text.strip().strip("$").strip()
    return text or None


def problem_text(value: Any) -> Optional[str]:
    """The problem statement (a chat prompt gives its last user turn; the DAPO template is removed)."""
    value = _plain(value)
    if isinstance(value, (list, tuple)):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role", "user") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith(DAPO_PREFIX.strip()):
        text = text[len(DAPO_PREFIX.strip()):]
    if text.endswith(DAPO_SUFFIX.strip()):
        text = text[:-len(DAPO_SUFFIX.strip())]
    return text.strip() or None


def _first(row: dict, preferred: str, keys: Iterable[str]) -> tuple[Optional[str], Any]:
    for key in (preferred, *keys):
        if key in row and row[key] is not None:
            return key, row[key]
    return None, None


def convert(rows: list[dict], spec: DatasetSpec, *, instruction: str, source: str,
            max_rows: Optional[int] = None) -> tuple[list[dict], dict]:
    """verl RL records and a report {read, written, dropped: {reason: count}, examples: {reason: [row index]}}."""
    dropped: dict[str, int] = {}
    examples: dict[str, list[int]] = {}
    seen: dict[str, str] = {}
    conflicts: set[str] = set()
    out: list[dict] = []

    def drop(reason: str, i: int) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1
        examples.setdefault(reason, [])
        if len(examples[reason]) < 5:
            examples[reason].append(i)

    for i, row in enumerate(rows):
        _, raw_problem = _first(row, spec.problem_key, PROBLEM_KEYS)
        problem = problem_text(raw_problem)
        if problem is None:
            drop("no_problem", i)
            continue
        key, raw_answer = _first(row, spec.answer_key, ANSWER_KEYS)
        answer = answer_text(raw_answer, key) if key else None
        if answer is None:
            drop("no_answer", i)
            continue
        if spec.english_only and _CJK.search(problem):
            drop("not_english", i)
            continue
        if spec.dedupe:
            norm = " ".join(problem.split())
            if norm in seen:
                if seen[norm] != answer and norm not in conflicts:
                    conflicts.add(norm)
                drop("duplicate", i)
                continue
            seen[norm] = answer
        extra = {k: str(_plain(row[k])) for k in EXTRA_KEYS if k in row and row[k] is not None}
        out.append({
            "data_source": spec.name,
            "prompt": [{"role": "user", "content": problem + instruction}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": spec.split, "index": len(out), "source": source, "problem": problem, **extra},
        })
    if conflicts:  # keep neither copy of a problem whose duplicates disagree on the answer
        bad = {" ".join(p.split()) for p in conflicts}
        kept = [r for r in out if " ".join(r["extra_info"]["problem"].split()) not in bad]
        dropped["conflicting_answers"] = len(out) - len(kept)
        out = kept
        for j, r in enumerate(out):
            r["extra_info"]["index"] = j
    if max_rows is not None:
        out = out[:max_rows]
    return out, {"read": len(rows), "written": len(out), "dropped": dropped, "examples": examples}


def prepare(names: Iterable[str], out_dir: str, *, sources: Optional[dict[str, str]] = None,
            train_instruction: str = TRAIN_INSTRUCTION, eval_instruction: str = EVAL_INSTRUCTION,
            max_rows: Optional[int] = None, log=print) -> dict[str, dict]:
    """Write `<out_dir>/<name>.parquet` for each dataset and `<out_dir>/prepare_report.json`; returns the report."""
    import pandas as pd

    sources = dict(sources or {})
    names = list(names)
    unknown = [n for n in [*names, *sources] if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}
    for name in names:
        spec = DATASETS[name]
        source = sources.get(name, spec.source)
        rows = read_rows(source, spec)
        instruction = train_instruction if spec.role == "train" else eval_instruction
        records, rep = convert(rows, spec, instruction=instruction, source=source, max_rows=max_rows)
        if not records:
            raise ValueError(f"{name} ({source}): none of {len(rows)} rows has a problem and an answer; "
                             f"dropped {rep['dropped']}. Check the source's schema against verl_eopd/math/data.py")
        path = out / f"{name}.parquet"
        pd.DataFrame(records).to_parquet(path)
        rep.update(source=source, path=str(path))
        report[name] = rep
        drops = ", ".join(f"{k} {v}" for k, v in rep["dropped"].items()) or "none"
        log(f"[data] {name}: {rep['read']} rows read from {source} -> {rep['written']} written to {path}; "
            f"dropped: {drops}")
    previous = out / "prepare_report.json"
    merged = json.loads(previous.read_text()) if previous.exists() else {}
    merged.update(report)
    previous.write_text(json.dumps(merged, indent=1))
    return report
