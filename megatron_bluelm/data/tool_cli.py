"""What ``tools/preprocess_data.py``'s sub-commands (``--chat``, ``--multimodal``) share on the command
line: the parser's common arguments and the exit status of a bad input."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from megatron_bluelm.config.errors import ConfigError


def subcommand_parser(mode: str, description: str, input_help: str, output_help: str) -> argparse.ArgumentParser:
    """``preprocess_data.py --MODE --input ... --output-prefix ... --tokenizer-model ...``."""
    p = argparse.ArgumentParser(prog=f"preprocess_data.py --{mode}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(f"--{mode}", action="store_true", required=True)
    p.add_argument("--input", nargs="+", required=True, help=input_help)
    p.add_argument("--output-prefix", required=True, help=output_help)
    p.add_argument("--tokenizer-model", required=True)
    return p


def run_or_exit_2(fn: Callable[[], str]) -> int:
    """Run the preprocessing; print its summary line (exit 0) or the input's error (exit 2)."""
    try:
        message = fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(message)
    return 0
