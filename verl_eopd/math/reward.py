"""Verifiable math reward: 1.0 when the response's final answer equals the ground truth, else 0.0.

`compute_score(data_source, solution_str, ground_truth, extra_info=None)` has verl's custom-reward
signature (`reward.custom_reward_function.path=pkg://verl_eopd.math.reward`, `name=compute_score`; extra keyword
arguments come from `reward.custom_reward_function.reward_kwargs`). The answer is the content of the
response's last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed x`); equivalence is decided by `math-verify`
(LaTeX and plain expressions through sympy: fractions vs decimals, roots, intervals, sets, percents, units,
thousands separators). Without a box the score is 0.0 when `box_required` (the training default: the prompt
asks for a box), else the answer is taken from an "answer is ..." / "Final Answer: ..." phrase, then the last
number (the evaluation fallback of the Qwen2.5-Math pipeline the paper evaluates with). An earlier box is
never used when the last one is wrong, so hedging with several boxes earns nothing.

Never raises and never hangs: any input (None, bytes, numbers, huge or malformed LaTeX) scores 0.0 on
failure. math-verify bounds its sympy work with `signal.alarm`, which works only in a process's main thread;
verl's reward loop calls the scorer from a thread pool, so off the main thread the check runs in a small pool
of scorer subprocesses (this file run as a script, `--serve`), each killed and replaced when it overruns its
wall-clock budget. This module imports only the standard library and math-verify, so those subprocesses
start in about a second.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
from typing import Any, Optional

DEFAULT_TIMEOUT_S = 5
# answers longer than this are not answers (a runaway generation inside a box); they score 0.0 without sympy
MAX_ANSWER_CHARS = 1000
_BOX_COMMANDS = ("\\boxed", "\\fbox")


# ------------------------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced) or `\\boxed x`; None if none."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # `\boxed 5`
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the generation was cut inside the box


_ANSWER_PHRASE = re.compile(
    r"(?:final answer is|the answer is|final answer\s*:|answer\s*:)\s*\$?(.+?)\$?\s*(?:\.\s|\.$|$|\n)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def fallback_answer(text: str) -> Optional[str]:
    """Answer of an unboxed response: the last "answer is X" phrase, else the last number; None if neither."""
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases and phrases[-1].strip():
        return phrases[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def extract_answer(text: str, box_required: bool = True) -> Optional[str]:
    """The response's final answer string (see the module docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None or box_required:
        return boxed
    return fallback_answer(text)


def gold_answers(ground_truth: Any) -> list[str]:
    """Ground truth as a list of answer strings: a string, a number, or a list of them (any may match)."""
    if isinstance(ground_truth, (list, tuple)) or type(ground_truth).__name__ == "ndarray":
        out = []
        for g in ground_truth:
            out.extend(gold_answers(g))
        return out
    if ground_truth is None or isinstance(ground_truth, bytes):
        return []
    text = str(ground_truth).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.strip().strip("$").strip()
    return [text] if text else []


def _as_text(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return None


def _canonical(s: str) -> str:
    return re.sub(r"\s+|\\[,;!: ]|\\left|\\right", "", s).rstrip(".")


# ----------------------------------------------------------------------------------------- equivalence


def _quick_verdict(pred: str, golds: list[str]) -> Optional[bool]:
    """What needs no sympy: False for an empty or oversized answer, True when identical up to spacing."""
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    if any(_canonical(pred) == _canonical(g) for g in golds):
        return True
    return None


def equivalent(pred: str, golds: list[str], timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """math-verify equivalence of an extracted answer and any gold answer. Main thread only (signal timeouts)."""
    quick = _quick_verdict(pred, golds)
    if quick is not None:
        return quick
    from math_verify import parse, verify

    timeout_s = max(1, int(timeout_s))
    # math-verify accepts 50 for a gold 50\% but not 50\% for a gold 50: also try the number without its sign
    preds = [pred] + ([re.sub(r"\\?%$", "", pred.rstrip())] if pred.rstrip().endswith("%") else [])
    try:
        for candidate in preds:
            pred_parsed = parse(f"\\boxed{{{candidate}}}", parsing_timeout=timeout_s)
            if not pred_parsed:
                continue
            for gold in golds:
                gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_s)
                if gold_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s):
                    return True
    except BaseException as exc:  # noqa: BLE001 - math-verify/sympy raise anything, incl. TimeoutException
        if isinstance(exc, KeyboardInterrupt):
            raise
    return False


# ------------------------------------------------------------- scorer subprocesses (off the main thread)


class _Scorer:
    """One `python reward.py --serve` subprocess: a JSON request per line in, a score per line out."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        if self._read(60.0) != "ready":
            self.kill()
            raise RuntimeError("verl_eopd.math.reward: the scorer subprocess did not start (is math-verify installed?)")

    def _read(self, wall_s: float) -> Optional[str]:
        ready, _, _ = select.select([self.proc.stdout], [], [], wall_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def score(self, request: dict, wall_s: float) -> Optional[float]:
        """The score, or None when the subprocess overran `wall_s` or died (it is then killed)."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self._read(wall_s)
            if line is not None:
                return float(json.loads(line)["score"])
        except (OSError, ValueError, KeyError):
            pass
        self.kill()
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()


class _ScorerPool:
    """Up to `size` scorer subprocesses shared by the calling threads; started on first use."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: list[_Scorer] = []
        self.started = 0
        self.cond = threading.Condition()

    def _acquire(self) -> _Scorer:
        with self.cond:
            while not self.idle and self.started >= self.size:
                self.cond.wait()
            if self.idle:
                return self.idle.pop()
            self.started += 1
        try:
            return _Scorer()
        except BaseException:
            with self.cond:
                self.started -= 1
                self.cond.notify()
            raise

    def _release(self, scorer: _Scorer) -> None:
        with self.cond:
            if scorer.alive():
                self.idle.append(scorer)
            else:
                self.started -= 1
            self.cond.notify()

    def score(self, request: dict, wall_s: float) -> float:
        scorer = self._acquire()
        try:
            result = scorer.score(request, wall_s)
        finally:
            self._release(scorer)
        return 0.0 if result is None else result


_POOL: Optional[_ScorerPool] = None
_POOL_LOCK = threading.Lock()


def _pool() -> _ScorerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _ScorerPool(size=int(os.environ.get("EOPD_REWARD_WORKERS", min(8, os.cpu_count() or 1))))
        return _POOL


def _serve() -> None:
    """Subprocess loop: read `{"pred", "golds", "timeout_s"}` lines from stdin, write `{"score": x}` lines."""
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            score = float(equivalent(req["pred"], req["golds"], req["timeout_s"]))
        except Exception:  # noqa: BLE001 - a bad request scores 0.0
            score = 0.0
        print(json.dumps({"score": score}), flush=True)


# ------------------------------------------------------------------------------------------- the reward


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None, *,
                  box_required: bool = True, timeout_s: int = DEFAULT_TIMEOUT_S, **_: Any) -> float:
    """verl custom reward: 1.0 if the response's final answer is equivalent to the ground truth, else 0.0.

    `box_required`: True (training) scores an unboxed response 0.0; False falls back to an "answer is"
    phrase, then the last number (evaluation). `timeout_s`: seconds per math-verify parse/compare step; off
    the main thread a whole check is killed after 4 x timeout_s. Unknown keyword arguments (verl passes
    reward-router fields) are ignored.
    """
    text = _as_text(solution_str)
    golds = gold_answers(ground_truth)
    if text is None or not golds:
        return 0.0
    pred = extract_answer(text, bool(box_required))
    if pred is None:
        return 0.0
    if threading.current_thread() is threading.main_thread():
        return float(equivalent(pred, golds, int(timeout_s)))
    quick = _quick_verdict(pred, golds)
    if quick is not None:
        return float(quick)
    # only the extracted answer crosses the pipe: the subprocess runs `equivalent` under its own signals
    request = {"pred": pred, "golds": golds, "timeout_s": int(timeout_s)}
    return _pool().score(request, wall_s=4.0 * max(1, int(timeout_s)))


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
