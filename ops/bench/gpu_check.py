"""The one prepared GPU check (`scripts/gpu_check.sh`): engine-level and Ray-free, in stages that
each run in a child process and write their JSON before the next starts; the table goes to stdout
and to a file (`--table`, else $MOE_GPU_CHECK_TABLE, else OUT/table.md).

    python -m ops.bench.gpu_check --device cuda --out /tmp/gpu_check          # an H200: ~5 minutes
    python -m ops.bench.gpu_check --device cpu --smoke --out /tmp/gpu_check   # here: tiny sizes

Stages (ops/bench/gpu_check_stages.py): probe; parity (bf16 on the device against fp32 references
made on a CPU machine, ops/bench/gpu_check_refs.py, on the tiny preset, a second small checkpoint
and an FP8 block checkpoint); speed with dummy weights in bf16 and with FP8 experts on the
`gpu-bench` preset (Mistral Small 4's layer sizes, 8 layers); transformers' generate on the same
model and device, after the engine's process has ended (so its memory is back).

`--smoke` shrinks everything (the tiny preset, batches 1/2/4, a few tokens) so the whole check runs
in a minute or two on a CPU: the suite runs it that way (tests/unit/test_bench_gpu_check_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ops.bench.common import REPO_ROOT
from ops.bench.gpu_check_refs import DEFAULT_CKPT_DIR, DEFAULT_REFS_DIR

TABLE_ENV = "MOE_GPU_CHECK_TABLE"
HBM_BYTES_PER_S = 4.8e12  # H200
STAGE_ORDER = ("probe", "parity", "speed-bf16", "speed-fp8", "transformers")


def stage_specs(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any], float]]:
    """stage -> (stage function, spec, timeout in seconds)."""
    smoke = args.smoke
    base = {"device": args.device}
    speed = {**base, "preset": "tiny" if smoke else "gpu-bench", "batches": [1, 2, 4] if smoke else [1, 8, 64],
             "decode_tokens": 4 if smoke else 64, "prompt_len": 16 if smoke else 128,
             "prefill_batch": 2 if smoke else 8, "prefill_len": 64 if smoke else 1024,
             "max_num_batched_tokens": 256 if smoke else 4096,
             "kv_cache_bytes": 64 * 2**20 if smoke else 16 * 2**30, "bandwidth": args.bandwidth_tb_s * 1e12}
    hf = {**base, "preset": speed["preset"], "batches": speed["batches"], "prompt_len": speed["prompt_len"],
          "decode_tokens": 4 if smoke else 32}
    checkpoints = ["tiny"] if smoke else ["tiny", "wide", "fp8"]
    return {
        "probe": ("probe", base, 60),
        "parity": ("parity", {**base, "dtype": "bfloat16", "checkpoints": checkpoints,
                              "ckpt_dir": str(args.ckpt_dir), "refs_dir": str(args.refs_dir)}, 120),
        "speed-bf16": ("speed", {**speed, "fp8": False}, 150),
        "speed-fp8": ("speed", {**speed, "fp8": True}, 150),
        "transformers": ("transformers", hf, 150),
    }


def run_stage(name: str, function: str, spec: dict[str, Any], out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Runs one stage in a child process; its result, or what went wrong, as a dict (also saved)."""
    spec_path, result_path = out_dir / f"{name}.spec.json", out_dir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "ops.bench.gpu_check", "--child", function, "--spec", str(spec_path),
           "--result", str(result_path)]
    started = time.perf_counter()
    log = out_dir / f"{name}.log"
    try:
        with log.open("w") as sink:
            code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=max(timeout_s, 1)).returncode
    except subprocess.TimeoutExpired:
        code = None
    seconds = round(time.perf_counter() - started, 1)
    if code == 0 and result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        result = {"error": f"timed out after {timeout_s:.0f} s" if code is None else f"exit code {code}",
                  "log_tail": tail}
    result["stage_s"] = seconds
    result_path.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"GPU check ({'smoke, ' if args.smoke else ''}device {args.device}; roofline at "
             f"{args.bandwidth_tb_s:g} TB/s)", ""]
    probe = results.get("probe")
    if probe is not None:
        keys = ("name", "capability", "memory_gib", "torch", "cuda", "transformers", "triton", "copy_tb_s",
                "bf16_matmul_rel_err", "scaled_mm", "grouped_mm", "cuda_graph", "mla_triton_import", "error")
        lines.append("probe: " + "; ".join(f"{k} {probe[k]}" for k in keys if k in probe))
        lines.append("")
    parity = results.get("parity")
    if parity is not None:
        lines += ["| parity (bf16 vs fp32 reference) | weights | positions | agree | near ties (< 0.3 sigma) | "
                  "verdict |", "|---|---|---|---|---|---|"]
        for row in parity.get("rows", []):
            lines.append(f"| {row['checkpoint']} | {row.get('weights', '')} | {row.get('compared', '-')} | "
                         f"{row.get('agreed', '-')} | {row.get('near_ties', '-')} | {row['verdict']} |")
            lines += [f"  - {v}" for v in row.get("violations", [])]
        if "error" in parity:
            lines.append(f"parity stage: {parity['error']}")
        lines.append("")
    hf = {r["batch"]: r["tokens_per_s"] for r in results.get("transformers", {}).get("decode", [])}
    lines += ["| weights | batch | decode tok/s | roofline tok/s | of roofline | transformers tok/s | x transformers |",
              "|---|---|---|---|---|---|---|"]
    goals = []
    for stage in ("speed-bf16", "speed-fp8"):
        res = results.get(stage)
        if res is None:
            continue
        what = "fp8 experts" if stage.endswith("fp8") else "bf16"
        if "error" in res:
            lines.append(f"| {what} | {res['error']} | | | | | |")
            continue
        for row in res["decode"]:
            base = hf.get(row["batch"])
            ratio = f"{row['tokens_per_s'] / base:.2f}" if base else "-"
            lines.append(f"| {what} | {row['batch']} | {row['tokens_per_s']:.1f} | {row['roofline_tokens_per_s']:.1f} "
                         f"| {100 * row['share_of_roofline']:.1f}% | {base if base else '-'} | {ratio} |")
            if row["batch"] == 1:
                goals.append(f"{what} decode at batch 1: {100 * row['share_of_roofline']:.1f}% of the roofline "
                             f"(goal 50%): {'met' if row['share_of_roofline'] >= 0.5 else 'not met'}")
            if row["batch"] == max(r["batch"] for r in res["decode"]) and base:
                goals.append(f"{what} batch {row['batch']}: {row['tokens_per_s'] / base:.2f}x transformers "
                             f"(goal 5x): {'met' if row['tokens_per_s'] >= 5 * base else 'not met'}")
        p = res["prefill"]
        lines.append(f"| {what} prefill | {p['batch']} x {p['prompt_len']} | {p['tokens_per_s']:.1f} (prefill) "
                     "| | | | |")
    if "error" in results.get("transformers", {}):
        lines.append(f"transformers stage: {results['transformers']['error']}")
    lines += ["", *goals]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole check in a minute or two on a CPU")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="a folder for each stage's JSON and log")
    p.add_argument("--table", type=Path, default=None, help=f"the table's file (else ${TABLE_ENV}, else OUT/table.md)")
    p.add_argument("--ckpt-dir", type=Path, default=DEFAULT_CKPT_DIR)
    p.add_argument("--refs-dir", type=Path, default=DEFAULT_REFS_DIR)
    p.add_argument("--stages", default=",".join(STAGE_ORDER), help="a comma-separated subset, in this order")
    p.add_argument("--budget-s", type=float, default=460.0,
                   help="all stages together (each gets at most what is left), so a run stays under 8 minutes")
    p.add_argument("--bandwidth-tb-s", type=float, default=HBM_BYTES_PER_S / 1e12, help="HBM bandwidth (H200: 4.8)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        from ops.bench.gpu_check_stages import STAGES

        result = STAGES[args.child](json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(result, indent=2))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    table_path = args.table or Path(os.environ.get(TABLE_ENV) or args.out / "table.md")
    specs = stage_specs(args)
    deadline = time.monotonic() + args.budget_s
    results: dict[str, dict[str, Any]] = {}
    for name in [s for s in STAGE_ORDER if s in args.stages.split(",")]:
        function, spec, timeout_s = specs[name]
        left = deadline - time.monotonic()
        print(f"== {name} (up to {min(timeout_s, left):.0f} s)", flush=True)
        results[name] = run_stage(name, function, spec, args.out, min(timeout_s, left))
        print(json.dumps(results[name])[:2000], flush=True)
        table_path.write_text(table(results, args))  # after every stage: a later crash keeps what was measured
    text = table(results, args)
    table_path.write_text(text)
    print(text, flush=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
