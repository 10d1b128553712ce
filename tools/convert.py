"""`kd-convert`: one command for checkpoint conversions (see tools/README.md).

User errors (missing files, wrong family, bad shapes...) print one paragraph on stderr and exit
with status 2; `verify` exits 1 when the logits differ past tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from tools.errors import ConvertError
from tools.io import DTYPES, parse_dtype


def _add_out_opts(p, shards=True, dtype_help="output dtype (default: keep the source dtype)"):
    p.add_argument("--dtype", choices=list(DTYPES), help=dtype_help)
    if shards:
        p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-convert", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("zero-to-hf", help="DeepSpeed ZeRO-3 checkpoint of a student -> HF directory")
    p.add_argument("ckpt_dir", help="run checkpoint dir (holding 'latest' and tag dirs) or one tag dir")
    p.add_argument("out_dir")
    p.add_argument("--tag", help="checkpoint tag (default: the one named in CKPT_DIR/latest)")
    p.add_argument("--engine", help="which trained engine of a checkpoint: student (default) or classmate (class KD); "
                                    "a path to <tag>/<engine>/ names it too")
    p.add_argument("--config-dir", help="where config.json/tokenizer live (default: CKPT_DIR or CKPT_DIR/hf_meta)")
    p.add_argument("--prefix", help="name prefix of the student's params (default: detected, e.g. '' or 'student.')")
    p.add_argument("--drop", action="append", default=[], metavar="REGEX",
                   help="leave out trainable params matching REGEX (repeatable)")
    _add_out_opts(p, dtype_help="output dtype (default fp32: the optimizer's master weights)")

    p = sub.add_parser("meta-llama3-to-hf", help="Meta's original Llama 3.x format -> HF Llama")
    p.add_argument("src", help="dir with consolidated.NN.pth, params.json, tokenizer.model")
    p.add_argument("out_dir")
    p.add_argument("--rope-factor", type=float, help="override the llama3 rope scaling factor (8, or 32 for 3.2 1B/3B)")
    p.add_argument("--instruct", action="store_true",
                   help="instruct model: Llama 3 chat template, <|eom_id|>/<|eot_id|> also end generation")
    _add_out_opts(p)

    p = sub.add_parser("hf-to-meta-llama3", help="HF Llama -> Meta's original format")
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--num-shards", type=int, default=1, help="model-parallel shards to write (default 1)")
    _add_out_opts(p, shards=False)

    p = sub.add_parser("gemma2-to-hf", help="Google's PyTorch (gemma_pytorch) Gemma-2 release -> HF Gemma2")
    p.add_argument("src", help="the *.ckpt file or its directory")
    p.add_argument("out_dir")
    p.add_argument("--config", help="gemma2-2b | gemma2-9b | gemma2-27b | path to a JSON config "
                                    "(default: SRC_DIR/params.json)")
    p.add_argument("--instruct", action="store_true",
                   help="instruction-tuned model: Gemma-2 chat template, <end_of_turn> also ends generation")
    _add_out_opts(p)

    p = sub.add_parser("hf-to-gemma2", help="HF Gemma2 -> gemma_pytorch model.ckpt + params.json")
    p.add_argument("src")
    p.add_argument("out_dir")
    _add_out_opts(p, shards=False)

    p = sub.add_parser("verify", help="compare the logits of two checkpoints of any supported format")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--prompt", help="text to run (needs a tokenizer in A or B)")
    p.add_argument("--tokens", help="comma-separated token ids instead of a prompt")
    p.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference allowed (default 1e-3)")
    p.add_argument("--min-top1", type=float, default=1.0, help="min top-1 agreement allowed (default 1.0)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype both models run in")
    p.add_argument("--gemma-config-a", help="--config for A when it is a gemma_pytorch checkpoint")
    p.add_argument("--gemma-config-b", help="--config for B when it is a gemma_pytorch checkpoint")

    p = sub.add_parser("vocab-check", help="can TEACHER and STUDENT be distilled token-to-token?")
    p.add_argument("teacher")
    p.add_argument("student")
    p.add_argument("--resize", action="store_true", help="pad/trim the student's embedding to the teacher's rows")
    p.add_argument("--rows", type=int, help="with --resize: target rows instead of the teacher's")
    p.add_argument("--out", help="with --resize: where to write the resized student")
    p.add_argument("--overwrite", action="store_true")
    return parser


def run(args) -> tuple[dict, int]:
    if args.command == "zero-to-hf":
        from tools.io import write_hf_checkpoint
        from tools.zero_to_hf import ZeroSource

        src = ZeroSource(args.ckpt_dir, tag=args.tag, config_dir=args.config_dir, prefix=args.prefix, drop=args.drop,
                         engine=args.engine)
        return write_hf_checkpoint(src, args.out_dir, parse_dtype(args.dtype or "fp32"), args.max_shard_size,
                                   args.overwrite), 0
    if args.command == "meta-llama3-to-hf":
        from tools.adapters.llama import MetaLlamaSource
        from tools.io import write_hf_checkpoint

        src = MetaLlamaSource(args.src, rope_factor=args.rope_factor, instruct=args.instruct)
        return write_hf_checkpoint(src, args.out_dir, parse_dtype(args.dtype), args.max_shard_size,
                                   args.overwrite), 0
    if args.command == "hf-to-meta-llama3":
        from tools.adapters.llama import hf_to_meta

        if args.num_shards < 1:
            raise ConvertError("--num-shards must be at least 1")
        return hf_to_meta(args.src, args.out_dir, args.num_shards, args.dtype, args.overwrite), 0
    if args.command == "gemma2-to-hf":
        from tools.adapters.gemma2 import GemmaPytorchSource
        from tools.io import write_hf_checkpoint

        src = GemmaPytorchSource(args.src, args.config, instruct=args.instruct)
        return write_hf_checkpoint(src, args.out_dir, parse_dtype(args.dtype), args.max_shard_size,
                                   args.overwrite), 0
    if args.command == "hf-to-gemma2":
        from tools.adapters.gemma2 import hf_to_gemma

        return hf_to_gemma(args.src, args.out_dir, args.dtype, args.overwrite), 0
    if args.command == "verify":
        from tools.verify import verify

        tokens = None
        if args.tokens:
            try:
                tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
            except ValueError:
                raise ConvertError(f"--tokens must be comma-separated integers, got '{args.tokens}'") from None
        result = verify(args.a, args.b, prompt=args.prompt, tokens=tokens, tol=args.tol, min_top1=args.min_top1,
                        gemma_config_a=args.gemma_config_a, gemma_config_b=args.gemma_config_b,
                        dtype=DTYPES[args.dtype])
        return result, 0 if result["ok"] else 1
    if args.command == "vocab-check":
        from tools.vocab import resize_student, vocab_check

        report = vocab_check(args.teacher, args.student)
        if args.resize:
            if not args.out:
                raise ConvertError("--resize needs --out DIR (the student directory is never modified in place)")
            report["resize"] = resize_student(report, args.out, args.rows, args.overwrite)
        report.pop("_sides")
        return report, 0
    raise ConvertError(f"unknown command {args.command}")


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    for key, value in report.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversions never need the network
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            report, code = run(args)
    except ConvertError as e:
        print(f"kd-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    _print(report, args.json)
    if args.command == "verify":
        print("verify: " + ("OK" if code == 0 else "FAILED: logits differ past tolerance"), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
