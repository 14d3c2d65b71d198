"""Stage command lines: arguments parsed and the config checked before torch / megatron-core load.

Every stage (``python -m megatron_bluelm.stages.pretrain`` and the others) goes through
:func:`run_stage_cli`:

1. known-noise warnings are filtered (:func:`filter_known_warnings`);
2. ``--config`` and the dotted overrides are parsed into a :class:`RunConfig` (typos, wrong types and
   values outside a field's choices fail here, naming the key);
3. the stage's cheap checks run (world size vs parallel layout, presets, divisibility, data files);
4. ``--print-config`` prints the resolved config as YAML and stops (a dry run);
5. only then the stage body runs, which imports torch and megatron-core.

A :class:`ConfigError` from any of these prints one line (on rank 0 only under ``torchrun``: every
rank sees the same arguments) and exits with status 2, without a traceback.

``--help`` is generated from the dataclasses in :mod:`megatron_bluelm.config.schema`: each field's
name, type, default, allowed values (``Literal`` types and the preset tables: the only place they are
written) and the comment beside it in the source.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import tempfile
import textwrap
import time
import tokenize
import types
import typing
import warnings
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import yaml

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config, to_dict
from megatron_bluelm.config.schema import RunConfig, literal_choices
from megatron_bluelm.config.validate import validate

# ---- warnings --------------------------------------------------------------------------------

# Messages known to be noise for our runs, each with why. Matched as regular expressions at the start of
# the warning's text (warnings.filterwarnings semantics).
KNOWN_NOISE = (
    # megatron-core asks for CUDA_DEVICE_MAX_CONNECTIONS=1 with sequence parallel / overlap on GPUs;
    # meaningless on CPU, and on GPU our launch scripts set it.
    r".*CUDA_DEVICE_MAX_CONNECTIONS",
    # megatron-core at import when Transformer Engine / apex are absent: models/spec.py chooses the
    # backend explicitly and says which one runs.
    r".*Transformer Engine and Apex are not installed",
    r".*Apex is not installed",
    r".*Transformer Engine is not installed",
    r".*apex was not installed",
    # torch.distributed on a gloo-only machine, and megatron-core probing optional packages.
    r".*No device id is provided via `init_process_group` or `barrier`",
    r".*nvidia-modelopt",
    r".*flash[-_]attn",
    # megatron-core's TransformerConfig default cuda_graph_scope, not a choice we make.
    r".*full scope is deprecated",
)


def filter_known_warnings() -> None:
    """Silence the warnings listed in :data:`KNOWN_NOISE` (the rest still show)."""
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


# ---- field documentation, generated from the dataclasses --------------------------------------


def _dynamic_choices() -> dict[str, list[str]]:
    """Choices that come from a table rather than a Literal type (the tables are the one source)."""
    from megatron_bluelm.config.presets import PRESETS
    from megatron_bluelm.config.vision import VISION_PRESETS

    return {"model.preset": sorted(PRESETS), "vision.preset": ["none", *sorted(VISION_PRESETS)]}


@lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """The comment beside each field in ``cls``'s source (or the comment block just above it)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        text = comments.get(node.lineno)
        if text is None:  # a comment block directly above the field
            block, ln = [], node.lineno - 1
            while ln >= 1 and ln in comments and lines[ln - 1].lstrip().startswith("#"):
                block.insert(0, comments[ln])
                ln -= 1
            text = " ".join(block)
        out[node.target.id] = text
    return out


def _type_name(tp) -> str:
    choices = literal_choices(tp)
    if choices is not None:
        return "{" + ",".join(str(c) for c in choices) + "}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | none" if type(None) in args else "")
    if origin in (list, tuple) or tp in (list, tuple):
        return "LIST"
    if origin is dict or tp is dict:
        return "MAPPING"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, getattr(tp, "__name__", str(tp)))


@dataclasses.dataclass
class FieldDoc:
    key: str  # dotted: section.field
    type: str
    default: Any
    choices: Optional[list]
    help: str


def describe_fields(root=RunConfig) -> list[tuple[str, str, list[FieldDoc]]]:
    """(section, section docstring, fields) for every section of the run config."""
    dynamic = _dynamic_choices()
    defaults = root()
    sections = []
    for sec in dataclasses.fields(root):
        value = getattr(defaults, sec.name)
        cls = type(value)
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        docs = []
        for f in dataclasses.fields(cls):
            key = f"{sec.name}.{f.name}"
            choices = dynamic.get(key)
            if choices is None and literal_choices(hints[f.name]) is not None:
                choices = list(literal_choices(hints[f.name]))
            type_name = "{" + ",".join(choices) + "}" if key in dynamic else _type_name(hints[f.name])
            docs.append(FieldDoc(key, type_name, getattr(value, f.name), choices, comments.get(f.name, "")))
        doc = inspect.getdoc(cls) or ""
        if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a docstring
            doc = ""
        sections.append((sec.name, doc, docs))
    return sections


def _format_default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return str(value)


def format_fields_help(root=RunConfig, width: int = 100) -> str:
    """The ``--help`` text of every config field, grouped by section."""
    out = ["config fields: set them in the --config YAML (section: {field: value}) or override any with",
           "--section.field VALUE (also --section.field=VALUE); 'none' sets an optional field to null.", ""]
    for name, doc, docs in describe_fields(root):
        out.append(f"{name}:" + (f"  {doc.splitlines()[0]}" if doc else ""))
        for d in docs:
            head = f"  --{d.key} {d.type}"
            tail = f"[default: {_format_default(d.default)}]"
            text = f"{d.help} {tail}" if d.help else tail
            if len(head) > 44:
                out.append(head)
                head = ""
            wrapped = textwrap.wrap(text, width=max(30, width - 46)) or [""]
            out.append(f"{head:<46}{wrapped[0]}")
            out.extend(" " * 46 + w for w in wrapped[1:])
        out.append("")
    return "\n".join(out)


# ---- the command line ------------------------------------------------------------------------


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _error_marker() -> Optional[str]:
    """A file rank 0 creates once its error line is out (under a launcher only): the other ranks wait for
    it before exiting, because torchrun stops every process as soon as the first one exits."""
    if world_size_from_env() <= 1:
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + "-" + os.environ.get("MASTER_PORT", "")
    return os.path.join(tempfile.gettempdir(), f"bluelm-config-error-{run}")


def report_error(message: str, wait_s: float = 60.0) -> None:
    """One line on stderr, from rank 0 only: under torchrun every rank fails the same way. The other
    ranks return once rank 0 has printed (or after ``wait_s``, e.g. when rank 0 is on another node)."""
    marker = _error_marker()
    if launch_rank() == 0:
        print(f"config error: {message}", file=sys.stderr, flush=True)
        if marker is not None:
            with open(marker, "w"):
                pass
        return
    deadline = time.monotonic() + wait_s
    while marker is not None and not _fresh(marker) and time.monotonic() < deadline:
        time.sleep(0.05)


_STARTED = time.time()


def _fresh(path: str) -> bool:
    """The marker exists and is of this launch (not left by an earlier run with the same run id / port)."""
    try:
        return os.path.getmtime(path) >= _STARTED - 30.0
    except OSError:
        return False


def stage_parser(description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description, epilog=format_fields_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--config", default=None, help="YAML recipe (examples/*.yaml); fields below override it")
    ap.add_argument("--print-config", action="store_true",
                    help="check the config and print it resolved (presets applied) as YAML, then exit")
    return ap


def print_config(cfg: RunConfig) -> None:
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False), end="")


def run_stage_cli(
    description: str,
    body: Callable[[RunConfig, argparse.Namespace], object],
    argv: Optional[Sequence[str]] = None,
    *,
    check: Optional[Callable[[RunConfig, int], object]] = None,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    prog: Optional[str] = None,
) -> None:
    """Parse, check (``check(cfg, world_size)``, default :func:`validate`), then run ``body(cfg, args)``.

    Nothing here imports torch; ``body`` does. Config errors exit with status 2 (see module doc)."""
    filter_known_warnings()
    ap = stage_parser(description, prog)
    if add_arguments is not None:
        add_arguments(ap)
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        (check or validate)(cfg, world_size_from_env())
        if args.print_config:
            print_config(cfg)
            return
        body(cfg, args)
    except ConfigError as e:
        report_error(str(e))
        sys.exit(2)
