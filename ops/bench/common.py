"""Helpers shared by the benchmarks in `ops/bench/`: seeded workloads, cached checkpoints, child
processes that report JSON, peak memory, and the marked sections of `docs/BENCHMARKS.md`.

Nothing here imports torch at module level, so a benchmark's parent process stays light and
each measured child pays its own imports.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
CACHE_ROOT = Path(os.environ.get("MOE_CLUSTER_CACHE", Path.home() / ".cache" / "moe-cluster"))
METADATA_FILE = "moe_cluster.json"  # written last by cluster.testing.checkpoint_writer.make_checkpoint

BENCHMARKS_INTRO = """# Benchmarks

Figures here are ratios measured side by side in one run on one machine (see "Measuring" in the
design notes): these machines are shared and noisy, so absolute numbers from different runs do not
compare. Each section below is written by the script named in it, between its own
`<!-- bench:NAME:start -->` / `<!-- bench:NAME:end -->` markers; re-run the command shown in a
section to refresh it.
"""


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def make_workload(seed: int, num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  token_range: tuple[int, int]) -> list[Request]:
    """`num_requests` requests in arrival order, lengths and token ids drawn uniformly (inclusive
    ranges) from one seeded generator, so every side of a benchmark sees the same requests."""
    rng = random.Random(seed)
    lo, hi = token_range
    out = []
    for _ in range(num_requests):
        p = rng.randint(*prompt_range)
        n = rng.randint(*output_range)
        out.append(Request([rng.randint(lo, hi) for _ in range(p)], n))
    return out


def fixed_request(seed: int, prompt_len: int, max_tokens: int, token_range: tuple[int, int]) -> Request:
    rng = random.Random(seed)
    return Request([rng.randint(*token_range) for _ in range(prompt_len)], max_tokens)


# -- checkpoints -------------------------------------------------------------------------------


def default_ckpt_dir(preset: str, seed: int) -> Path:
    return CACHE_ROOT / f"{preset}-seed{seed}"


def ensure_checkpoint(directory: Path, preset: str, seed: int) -> Path:
    """Reuses `directory` when its metadata says it holds `preset`/`seed`, else writes it there."""
    meta_path = directory / METADATA_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("preset") != preset or meta.get("seed") != seed or meta.get("script") is not None:
            raise SystemExit(f"{directory} holds checkpoint {meta}, not preset {preset!r} seed {seed}; "
                             "pass another --ckpt-dir or remove it")
        return directory
    from cluster.testing.checkpoint_writer import make_checkpoint

    t0 = time.perf_counter()
    print(f"writing the {preset!r} checkpoint (seed {seed}) to {directory} ...", file=sys.stderr, flush=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    make_checkpoint(directory, preset=preset, seed=seed)
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return directory


# -- child processes ---------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_child(module: str, side: str, spec: dict, workdir: Path, threads: int, timeout: float | None) -> dict:
    """Runs `python -m module --child side --spec F --result G` with the thread count pinned in
    the environment too, and returns the JSON the child wrote to G."""
    spec_path, result_path = workdir / f"{side}.spec.json", workdir / f"{side}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", module, "--child", side, "--spec", str(spec_path), "--result", str(result_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, timeout=timeout, stdout=sys.stderr)
    except subprocess.TimeoutExpired as e:
        raise SystemExit(f"child {side!r} ran past {timeout} s: {shlex.join(cmd)}") from e
    if proc.returncode != 0:
        raise SystemExit(f"child {side!r} failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    if not result_path.exists():
        raise SystemExit(f"child {side!r} exited 0 but wrote no result to {result_path}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def write_result(path: str | Path, result: dict) -> None:
    result = {**result, "peak_rss_mib": peak_rss_mib(), "process_cpu_s": cpu_seconds()}
    Path(path).write_text(json.dumps(result))


# -- docs --------------------------------------------------------------------------------------


def replace_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> Path:
    """Puts `body` between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` in `path`,
    appending the markers when absent and creating the file with a short intro when missing."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else BENCHMARKS_INTRO
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def machine_line(threads: int) -> str:
    load = os.getloadavg()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpus} CPUs{f' ({model})' if model else ''}, torch threads {threads}, "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)")
