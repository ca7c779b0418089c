"""The default run's held-out lift over run seeds (issue 24), one seed after another, as a newcomer runs it:
`python -m verl_eopd.main algorithm=eopd "trainer.logger=[console,file]"` with `data.seed=S
actor_rollout_ref.rollout.seed=S` (prompt order and the rollout's sampling), each seed in its own folder with an
empty EOPD_CACHE; then the lifts, their spread, the count reaching the target and a one-sided t against it.

    python scripts/lift_seeds.py --seeds 4 5 6 --out runs/lift                  # the default schedule
    python scripts/lift_seeds.py --seeds 4 5 6 --out runs/mb256 --compare runs/lift \\
        -- actor_rollout_ref.actor.ppo_mini_batch_size=256                        # another schedule, seed-paired
    python scripts/lift_seeds.py --out runs/lift --read                          # only the table of finished seeds

Resumable: a seed whose folder holds a finished run of the same command is read, not run again. Each seed's
done.json records the command, exit status, wall time, the commit, the torch kernels (AVX2 / AVX512) and the
host's CPU steal and idle share over the run (/proc/stat). The analysis: verl_eopd/math/lift.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from verl_eopd.math.lift import lift_stats, paired_lifts, seed_record

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "lift"


def command(seed: int, algorithm: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "verl_eopd.main", f"algorithm={algorithm}", "trainer.logger=[console,file]",
            f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}", f"trainer.project_name={PROJECT}",
            f"trainer.experiment_name=seed{seed}", *overrides]


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal ...); [] elsewhere."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return []


def shares(before: list[int], after: list[int]) -> dict:
    d = [b - a for a, b in zip(before, after)]
    total = sum(d)
    if len(d) < 8 or total <= 0:
        return {"steal_pct": None, "idle_pct": None}
    return {"steal_pct": 100 * d[7] / total, "idle_pct": 100 * d[3] / total}


PAIR_ENVS = ("EOPD_PAIR_DIR", "EOPD_EMBEDDED_TASK")  # which pair the command trains: part of a seed's identity


def pair_env() -> dict[str, str]:
    """The pair-choosing environment variables that are set (recorded with each seed; a finished seed run on
    another pair is run again, not read)."""
    return {k: os.environ[k] for k in PAIR_ENVS if k in os.environ}


def log_path(folder: Path, seed: int) -> Path:
    return folder / PROJECT / f"seed{seed}.jsonl"


def run_seed(folder: Path, seed: int, cmd: list[str]) -> dict:
    """Run one seed in `folder` (emptied first) with an empty EOPD_CACHE; returns and writes done.json."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "cache").mkdir(parents=True)
    env = {**os.environ, "EOPD_CACHE": str(folder / "cache"), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VERL_FILE_LOGGER_PATH", None)
    env.pop("VERL_FILE_LOGGER_ROOT", None)
    before, t0 = cpu_times(), time.time()
    with open(folder / "out.txt", "w") as out:
        rc = subprocess.run(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    done = {"seed": seed, "command": cmd[1:], "pair_env": pair_env(), "rc": rc, "wall_s": time.time() - t0,
            "commit": commit, "cpu_capability": torch.backends.cpu.get_cpu_capability(), **shares(before, cpu_times())}
    (folder / "done.json").write_text(json.dumps(done, indent=1))
    return done


def finished(folder: Path, cmd: list[str]) -> bool:
    p = folder / "done.json"
    if not p.exists():
        return False
    done = json.loads(p.read_text())
    return done["rc"] == 0 and done["command"] == cmd[1:] and done.get("pair_env", {}) == pair_env()


def read(out: Path) -> tuple[dict[int, dict], list[int]]:
    """({seed: seed_record + done.json} of the seeds in `out` that finished, [seeds whose run failed])."""
    rows, failed = {}, []
    for d in sorted(out.glob("seed*")):
        if not (d / "done.json").exists():
            continue
        done = json.loads((d / "done.json").read_text())
        if done["rc"] != 0:
            print(f"[lift] seed {done['seed']}: exit status {done['rc']} (see {d / 'out.txt'})", file=sys.stderr)
            failed.append(done["seed"])
            continue
        rows[done["seed"]] = {**seed_record(log_path(d, done["seed"])), **done}
    return rows, failed


def table(rows: dict[int, dict], target: float, st: dict | None) -> str:
    """The seeds' table, then `st` (lift_stats of their lifts, None under 2 seeds) in one line."""
    lines = ["| seed | step 0 | last step | lift | median step | whole command | kernels | steal | idle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s, r in sorted(rows.items()):
        steal = "" if r["steal_pct"] is None else f"{r['steal_pct']:.2f}%"
        idle = "" if r["idle_pct"] is None else f"{r['idle_pct']:.0f}%"
        step = "" if r["median_step_s"] is None else f"{r['median_step_s']:.1f} s"
        lines.append(f"| {s} | {r['before']:.1f}% | {r['after']:.1f}% (step {r['last_step']}) | {r['lift']:+.1f} | "
                     f"{step} | {r['wall_s'] / 60:.1f} min | {r['cpu_capability']} | {steal} | {idle} |")
    if st is not None:
        lines.append(f"\nlift over {st['n']} seeds: mean {st['mean']:+.1f}, SD {st['sd']:.1f}, 95% t interval "
                     f"[{st['ci95'][0]:+.1f}, {st['ci95'][1]:+.1f}] (df = {st['df']}); {st['reach_target']} of "
                     f"{st['n']} reach {target:+g}; one-sided t against {target:g}: t({st['df']}) = {st['t']:.2f}, "
                     f"p = {st['p_one_sided']:.3g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="run seeds (data.seed = rollout.seed = S)")
    p.add_argument("--out", required=True, help="one folder per seed is made here")
    p.add_argument("--algorithm", default="eopd")
    p.add_argument("--target", type=float, default=25.0, help="the lift, in points, each seed should reach")
    p.add_argument("--compare", default=None, help="another --out: the seed-paired difference this - that")
    p.add_argument("--read", action="store_true", help="run nothing; print the finished seeds")
    p.add_argument("--dry-run", action="store_true", help="print each seed's command and run nothing")
    p.add_argument("overrides", nargs="*", help="hydra overrides after `--`, the same for every seed")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    if not args.read and not args.seeds:
        p.error("--seeds is needed to run (or --read to only print)")
    if not args.read:
        for s in args.seeds:
            cmd = command(s, args.algorithm, args.overrides)
            folder = out / f"seed{s}"
            if args.dry_run:
                env = "".join(f"{k}={v} " for k, v in pair_env().items())
                print(f"[lift] seed {s} in {folder}: {env}EOPD_CACHE={folder / 'cache'} {' '.join(cmd)}")
            elif finished(folder, cmd):
                print(f"[lift] seed {s}: already done in {folder}")
            else:
                done = run_seed(folder, s, cmd)
                print(f"[lift] seed {s}: exit {done['rc']}, {done['wall_s'] / 60:.1f} min", flush=True)
        if args.dry_run:
            return 0
    if not out.is_dir():
        p.error(f"--out {out}: no such folder (nothing was run there)")
    rows, failed = read(out)
    st = lift_stats([r["lift"] for r in rows.values()], args.target) if len(rows) >= 2 else None
    print(table(rows, args.target, st))
    summary = {"rows": {str(s): r for s, r in rows.items()}}
    if st is not None:
        summary["stats"] = st
    if args.compare:
        other, _ = read(Path(args.compare).resolve())
        try:
            pair = paired_lifts({s: r["lift"] for s, r in rows.items()}, {s: r["lift"] for s, r in other.items()})
        except ValueError as e:  # not an error: a study in progress has one seed in both first
            print(f"paired with {args.compare}: {e}")
        else:
            summary["paired"] = {"against": args.compare, **pair}
            print(f"paired with {args.compare} on seeds {pair['seeds']}: {pair['mean_diff']:+.1f} "
                  f"[{pair['ci95'][0]:+.1f}, {pair['ci95'][1]:+.1f}], t({pair['df']}) = {pair['t']:.2f}, "
                  f"two-sided p = {pair['p_two_sided']:.3g} (one-sided, this above: {pair['p_one_sided']:.3g})")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
