"""Command line: `sdmprune compress | prune | finetune | eval | inspect | gguf` (each has --help).

Parse → config → recipe: no pipeline logic here."""

from __future__ import annotations

import argparse
import sys

from .distributed import init_from_env, shutdown
from .errors import SdmpruneError
from .options import add_arguments, build
from .recipes import COMMANDS, METHODS, Recipe

DEFAULT_METHOD = "scoring"
EXAMPLES = {
    "prune": "sdmprune prune --ratio 0.2 --output runs/smollm2-p20",
    "compress": "sdmprune compress --ratio 0.2 --output runs/smollm2-c20 (add --dry-run to see the plan)",
    "finetune": "sdmprune finetune --model runs/p20 --data ../shared/data/instruct/alpaca_data_1k.json --merge "
                "--output runs/p20-lora",
    "eval": "sdmprune eval --model runs/p20 --tasks sdmprune --limit 200 --output runs/p20-eval",
    "inspect": "sdmprune inspect runs/p20",
    "gguf": "sdmprune gguf runs/p20 --gguf q8_0 (then: llama-cli -m runs/p20/p20-q8_0.gguf)",
}


def _method(argv: list[str]) -> str:
    """The value of --method in `argv` (the options of `prune` depend on it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    return pre.parse_known_args(argv)[0].method


def build_parser(method: str = DEFAULT_METHOD) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdmprune", description="Structured pruning of causal LMs, exported as "
                                     "plain Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)
    recipes = {"prune": METHODS.get(method, METHODS[DEFAULT_METHOD]), **COMMANDS}
    for name, recipe in recipes.items():
        sub = commands.add_parser(name, help=recipe.description, description=f"{recipe.description}. Example: "
                                  f"{EXAMPLES[name]}")
        if name == "prune":
            sub.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="; ".join(
                f"{m}: {r.description}" for m, r in METHODS.items()) + " (each method has its own options: "
                "`sdmprune prune --method NAME --help`)")
        add_arguments(sub, recipe.config, "options")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    method = _method(argv)
    try:
        args = vars(build_parser(method).parse_args(argv))
    except SystemExit as exit_:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(exit_.code or 0)
    command = args.pop("command")
    args.pop("method", None)
    recipe: Recipe = METHODS[method] if command == "prune" else COMMANDS[command]
    joined = init_from_env()  # under torchrun / accelerate launch: join the other processes
    try:
        recipe.run(build(recipe.config, args))
    except SdmpruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if joined:
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
