"""What one engine step sends per request: the delta `EngineOutput` the engine emits now against
the cumulative output it used to send (the prompt ids, every output id and logprob, the text so far),
pickled as Ray pickles them, at a few steps of one long-prompt request.

  python -m ops.bench.output_payload --write-docs   # a 16,384-token prompt on the `small` preset
  python -m ops.bench.output_payload --smoke        # tiny checkpoint, seconds (the test suite runs this)

Both sides come from the same run: the engine's delta outputs as emitted, and the cumulative
output rebuilt from them by an `OutputAggregator` (the text made as the old engine made it) plus
the prompt ids, in the old `RequestOutput` layout.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ops.bench.common import default_ckpt_dir, ensure_checkpoint, fixed_request, machine_line, replace_section

PROTOCOL = 5  # what Ray's serializer uses
TOKEN_RANGE = (1000, 100_000)


@dataclass(frozen=True)
class CumulativeOutput:
    """The layout the engine sent before delta outputs: everything so far, after every step."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: tuple | None = None


def _pickle_us(obj: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pickle.dumps(obj, protocol=PROTOCOL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(ckpt: Path, prompt_len: int, steps: int, logprobs: int | None, repeats: int) -> list[dict]:
    from cluster import LLM, SamplingParams
    from cluster.engine.output_aggregator import OutputAggregator, OutputKind

    llm = LLM(ckpt, max_model_len=prompt_len + steps + 1, kv_cache_bytes=1 << 30, max_num_batched_tokens=2048)
    engine = llm.engine
    prompt = fixed_request(0, prompt_len, steps, TOKEN_RANGE).prompt
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=logprobs)
    engine.add_request("bench", prompt, params)
    text = OutputAggregator("bench", params, llm.tokenizer, OutputKind.CUMULATIVE)
    marks = sorted({1, max(1, steps // 2), steps})
    rows, step, sent_delta, sent_cumulative = [], 0, 0, 0
    while engine.has_unfinished():
        for delta in engine.step():
            step += 1
            whole = text.add(delta)
            old = CumulativeOutput("bench", tuple(prompt), whole.token_ids, delta.new_token_ids, whole.text,
                                   whole.finished, whole.finish_reason, whole.stop_reason, whole.logprobs)
            new_bytes, old_bytes = len(pickle.dumps(delta, PROTOCOL)), len(pickle.dumps(old, PROTOCOL))
            sent_delta, sent_cumulative = sent_delta + new_bytes, sent_cumulative + old_bytes
            if step in marks:
                rows.append({"step": step, "delta_bytes": new_bytes, "cumulative_bytes": old_bytes,
                             "delta_us": _pickle_us(delta, repeats), "cumulative_us": _pickle_us(old, repeats),
                             "delta_total": sent_delta, "cumulative_total": sent_cumulative})
    if step != steps:
        raise SystemExit(f"the request made {step} outputs, expected {steps}")
    return rows


def report(args: argparse.Namespace, rows_by_logprobs: dict[str, list[dict]]) -> str:
    lines = [
        "## Engine output payload per step: `ops/bench/output_payload.py`",
        "",
        f"- Command: `python -m ops.bench.output_payload{' --smoke' if args.smoke else ''}"
        f"{' --write-docs' if args.write_docs else ''}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine_line(1)}",
        f"- Checkpoint: preset `{args.preset}`; one request, prompt {args.prompt_len:,} tokens, "
        f"{args.steps} output tokens, greedy",
        "- Sizes are `pickle.dumps(output, protocol=5)` (Ray's serializer) of the request's output at that "
        f"step; times are the median of {args.repeats} pickles; \"so far\" sums every step up to it.",
        "",
        "| logprobs | step | cumulative (before) bytes | delta (now) bytes | ratio | pickle µs before | "
        "pickle µs now | bytes so far before | bytes so far now |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows in rows_by_logprobs.items():
        for r in rows:
            lines.append(f"| {label} | {r['step']} | {r['cumulative_bytes']:,} | {r['delta_bytes']:,} | "
                         f"{r['cumulative_bytes'] / r['delta_bytes']:.0f}x | {r['cumulative_us']:.1f} | "
                         f"{r['delta_us']:.1f} | {r['cumulative_total']:,} | {r['delta_total']:,} |")
    lines += ["", "The delta's size does not grow with the step (the prompt ids travel once, on the first "
              "output; the first row's delta carries them); the cumulative output grew by every token, so "
              "a request's total was quadratic in its length."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, short prompt: seconds")
    ap.add_argument("--preset", default=None, help="default: small (tiny with --smoke)")
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint directory (written when missing)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: 16384 (256 with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="output tokens; default: 64 (8 with --smoke)")
    ap.add_argument("--repeats", type=int, default=None, help="pickles per timing; default: 200 (20 with --smoke)")
    ap.add_argument("--write-docs", action="store_true", help="write the section of docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "small")
    args.prompt_len = args.prompt_len or (256 if args.smoke else 16384)
    args.steps = args.steps or (8 if args.smoke else 64)
    args.repeats = args.repeats or (20 if args.smoke else 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    ckpt = ensure_checkpoint(args.ckpt_dir or default_ckpt_dir(args.preset, 0), args.preset, 0)
    rows = {label: measure(ckpt, args.prompt_len, args.steps, lp, args.repeats)
            for label, lp in (("none", None), ("top 5", 5))}
    text = report(args, rows)
    print(text)
    if args.write_docs:
        print(f"wrote {replace_section('output-payload', text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
