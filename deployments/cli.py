"""`moe-cluster`: make checkpoints, generate offline, serve, check a model directory, plan memory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster.errors import ClusterError


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--script takes token ids separated by commas or spaces: {exc}") from exc


def _block(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--fp8-block takes two positive integers 'rows,cols', got {text!r}")
    return int(parts[0]), int(parts[1])


def _parser() -> argparse.ArgumentParser:
    from cluster.testing.presets import PRESETS

    p = argparse.ArgumentParser(prog="moe-cluster", description="Serve Mistral Small 4 (MoE) on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random checkpoint of the real architecture",
                        description="Writes a Hugging Face checkpoint (config.json, safetensors, tekken.json) "
                                    "of the Mistral3 architecture (Pixtral + Mistral4 MoE) with random weights.")
    mk.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    mk.add_argument("--out", required=True, type=Path, help="directory to write (created if missing)")
    mk.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    mk.add_argument("--script", type=_ids, default=None,
                    help="token ids that greedy decoding emits after any prompt, then end-of-sequence "
                         "(e.g. '25,1784,26'); each token id must have a single successor")
    mk.add_argument("--expert-layout", choices=["fused", "per_expert"], default="fused",
                    help="fused experts.gate_up_proj (as transformers saves) or one tensor per expert "
                         "(as published MoE checkpoints)")
    mk.add_argument("--num-files", type=int, default=1, help="split the weights over this many safetensors files")
    mk.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the weights")
    mk.add_argument("--fp8", choices=["block", "static"], default=None,
                    help="write the linear layers in FP8 as transformers' quant_method 'fp8' does: 'block' "
                         "(scale grids of --fp8-block, dynamic activations) or 'static' (one scale per tensor, "
                         "static activation scales); vision tower, projector and lm_head stay unquantized")
    mk.add_argument("--fp8-block", type=_block, default=(128, 128), help="block of --fp8 block (default 128,128)")

    gen = sub.add_parser("generate", help="print a completion of a prompt",
                         description="Runs the engine in this process and prints the completion.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", type=Path, default=None,
                     help="model directory (default: the embedded tiny checkpoint, made once and cached)")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--token-ids", action="store_true", help="also print the generated token ids")

    from deployments import check_command, plan_command, serve_command

    serve_command.add_parser(sub)
    check_command.add_parser(sub)
    plan_command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-checkpoint":
            from cluster.testing.checkpoint_writer import make_checkpoint

            out = make_checkpoint(args.out, args.preset, seed=args.seed, script=args.script,
                                  expert_layout=args.expert_layout, num_files=args.num_files, dtype=args.dtype,
                                  fp8=args.fp8, fp8_block=args.fp8_block)
            print(f"wrote {args.preset} checkpoint to {out}")
            return 0
        if args.command == "generate":
            from cluster import LLM, SamplingParams

            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, seed=args.seed)
            completion = LLM(args.model).generate(args.prompt, params, use_tqdm=False)[0]
            print(completion.text)
            if args.token_ids:
                print(f"token ids: {list(completion.token_ids)} (finish: {completion.finish_reason})")
            return 0
        if args.command == "serve":
            from deployments import serve_command

            return serve_command.run(args)
        if args.command == "check":
            from deployments import check_command

            return check_command.run(args)
        if args.command == "plan":
            from deployments import plan_command

            return plan_command.run(args)
    except ClusterError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"moe-cluster: error: {message}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
