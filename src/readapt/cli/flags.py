"""Command-line flags generated from the config dataclasses, so that every default and help text is written once
(in the dataclass field: `metadata={"help": ..., "choices": ..., "type": ..., "group": ..., "flag": ...}`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_SCALARS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}
_PARSERS: dict[str, Callable[[str], Any]] = {"positive_int": positive_int, "comma_list": comma_list}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One generated flag: the config field it fills and the argparse destination it is read back from."""

    field: str
    dest: str


def add_adapter_arguments(parser: argparse.ArgumentParser, adapter_help: str, name_help: str) -> None:
    """--model, --adapter (repeatable) and --name (repeatable): the adapters that `readapt predict` and `readapt
    serve` load onto one backbone."""
    parser.add_argument("--model", help="the backbone every adapter was trained on (default: the one the first adapter "
                        "records, else the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR", help=adapter_help)
    parser.add_argument("--name", action="append", default=[], metavar="NAME",
                        help=f"{name_help} of the adapter at the same position (default: the adapter folder's name, "
                             "or its run folder's for <run>/adapter); repeatable")


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, only: Iterable[str] | None = None,
                         skip: Iterable[str] = (), flag_names: dict[str, str] | None = None, prefix: str = "",
                         unset_defaults: bool = False, groups: dict[str, Any] | None = None) -> list[Flag]:
    """Add one flag per field of dataclass `cls` that has help metadata and a type the command line can parse.

    `prefix` goes in front of every flag and destination ("read-": --read-hidden-size, args.read_hidden_size)
    unless `flag_names` names the flag; `unset_defaults`: every flag defaults to None (the config's own default
    applies when the flag is not given; for options passed on to a method). Returns the flags added."""
    only, skip, flag_names = (set(only) if only is not None else None), set(skip), flag_names or {}
    groups = {} if groups is None else groups
    added = []
    for spec in dataclasses.fields(cls):
        meta = spec.metadata
        if not spec.init or "help" not in meta or not meta.get("cli", True):
            continue
        if (only is not None and spec.name not in only) or spec.name in skip:
            continue
        kind = str(spec.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
        parse = _PARSERS.get(meta.get("type")) or _SCALARS.get(kind)
        if kind != "bool" and parse is None:
            continue  # lists, dicts, nested configs: not a flag
        dest = prefix.replace("-", "_") + spec.name
        default = None if unset_defaults else meta.get("cli_default", _default(spec))
        flag = flag_names.get(spec.name, "--" + prefix + spec.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": dest, "help": meta["help"]}
        if kind == "bool":
            if "None" in str(spec.type):
                kwargs.update(action=argparse.BooleanOptionalAction, default=None)
            elif _default(spec):  # on by default: the flag turns it off
                if not flag.startswith("--no-"):
                    flag = "--no-" + flag[2:]
                kwargs.update(action="store_false", default=default)
            else:
                kwargs.update(action="store_true", default=default)
        else:
            kwargs.update(type=parse, default=default)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
            shown = _default(spec)
            if shown is not None and "default" not in meta["help"]:
                kwargs["help"] += f" (default: {shown})"
        target = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        target.add_argument(flag, **kwargs)
        added.append(Flag(spec.name, dest))
    return added


def given_values(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[str, Any]:
    """{field: value} of the flags whose value is not None (given, or with a default of their own)."""
    values = {flag.field: getattr(args, flag.dest) for flag in flags}
    return {name: value for name, value in values.items() if value is not None}


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return None
