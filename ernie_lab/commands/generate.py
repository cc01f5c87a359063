"""``ernie-lab generate [SRC] --prompt TEXT``: stream a continuation (or, with ``--chat``, a reply)."""

from __future__ import annotations

import argparse
import sys

import torch

from ernie_lab.commands import DTYPE_CHOICES, SRC_HELP, add_threads_option, apply_threads, check_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate a continuation of --prompt (or a chat reply with --chat), printing text as "
        "tokens arrive. Generation stops at the tokenizer's end-of-sentence ids or --max-new-tokens.",
    )
    parser.add_argument("src", metavar="SRC", nargs="?", default="toy", help=f"{SRC_HELP}; default toy")
    parser.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--system", default=None, help="system text for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    add_threads_option(parser)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm bar on stderr (default: on unless stdout and stderr share a terminal, where the "
        "streamed text is the progress)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from ernie_lab.generation.generate import stream
    from ernie_lab.generation.options import check_sampling
    from ernie_lab.io.tokenizer import load_tokenizer
    from ernie_lab.io.weights import load_model

    check_args(args, at_least={"threads": 1}, requires={"system": "chat"})
    sampling = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    try:  # before loading the model
        check_sampling(**{name: getattr(args, name) for name in sampling})
    except ValueError as err:  # "top_p must be ..." -> "--top-p must be ...", the option as typed
        name, rest = str(err).split(" ", 1)
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    ignored = [f"--{n.replace('_', '-')}" for n in ("top_k", "top_p", "min_p", "seed") if getattr(args, n) is not None]
    if args.temperature == 0 and ignored:
        raise ValueError(f"{', '.join(ignored)} need --temperature > 0 (greedy decoding, the default, ignores them)")
    apply_threads(args.threads, "generate")
    tokenizer = load_tokenizer(args.src)
    model = load_model(args.src, dtype=args.dtype, device=args.device)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens; give some text")
    progress = args.progress
    if progress is None:
        progress = not (sys.stdout.isatty() and sys.stderr.isatty())
    steps = stream(
        model,
        torch.tensor([prompt]),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=tokenizer.eos_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        seed=args.seed,
        progress=progress,
    )
    if not args.chat:
        sys.stdout.write(args.prompt)
    print_stream(tokenizer, (int(ids[0]) for ids in steps), set(tokenizer.eos_token_ids))
    return 0


def print_stream(tokenizer, ids, stop_ids: set[int]) -> str:
    """Write the decoded text of ``ids`` to stdout as it grows; return the whole text.

    The generated ids are re-decoded each step and only the new suffix is written, so characters
    spanning several tokens (byte pieces) appear once complete; an end-of-sentence id is not printed.
    """
    generated: list[int] = []
    shown = ""
    for token in ids:
        if token in stop_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next byte
            continue
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    sys.stdout.flush()
    return shown
