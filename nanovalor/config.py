"""Command-line overrides for the entry scripts' config dataclasses: `--field=value` (or `--field value`).

Each entry script (train.py, sample.py, eval.py) keeps its whole configuration in one dataclass with documented
defaults; `parse(Config, argv)` returns an instance with the overrides applied. An unknown field or a value of the
wrong type is an error that names it. Fields typed `list[str]` may be given several times (`--image a --image b`).
`checked(fn, ...)` turns such an error, or a missing or malformed input file, into a one-line `error: ...` exit.
`--help` (or `-h`) lists every option with its default and the comment beside it in the dataclass.
"""
import dataclasses
import inspect
import re
import sys
import types
import typing


def _convert(name, kind, text):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}={text}: expected a boolean (true/false)")
    if typing.get_origin(kind) is list:
        return [text]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `str | None`: convert to the non-None type
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name}={text}: expected {kind.__name__}") from None


def usage(config_class, script=None):
    """Every option of config_class: `--name=default`, then the comment written beside the field (and on the comment
    lines right below it), read from the source so that the help is the code's own documentation."""
    lines, comments, name = inspect.getsource(config_class).splitlines(), {}, None
    for line in lines:
        field_line = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$", line)
        if field_line and not line.strip().startswith("#"):
            name = field_line[1]
            comments[name] = [field_line[2] or ""]
        elif name and line.strip().startswith("#"):
            comments[name].append(line.strip()[1:].strip())
    doc = (config_class.__module__ and sys.modules[config_class.__module__].__doc__ or "").strip().split("\n\n")[0]
    out = [f"usage: python {script or sys.argv[0]} [--field=value ...]", "", doc, "", "options:"]
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(f"  --{f.name}={default!r}")
        out += [f"      {c}" for c in comments.get(f.name, []) if c]
    return "\n".join(out)


def parse(config_class, argv=None):
    """Return config_class() with `--field=value` overrides from argv (default: sys.argv[1:]) applied."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(usage(config_class))
        raise SystemExit(0)
    fields = typing.get_type_hints(config_class)  # name -> type, in declaration order
    values = {}
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: expected --field=value")
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if fields.get(name) is bool and (not argv or argv[0].startswith("--")):
                text = "true"  # a bare --flag switches a boolean on
            elif argv:
                text = argv.pop(0)
            else:
                raise ValueError(f"--{name}: missing value")
        if name not in fields:
            raise ValueError(f"unknown option --{name}; valid options: {', '.join('--' + f for f in fields)}")
        value = _convert(name, fields[name], text)
        values[name] = values.get(name, []) + value if isinstance(value, list) else value
    return config_class(**values)


def checked(fn, *args, **kwargs):
    """fn(*args): bad input (a missing file, a malformed checkpoint or dataset) ends the script with its message."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def diff(config):
    """The fields of `config` that differ from the class defaults, as a dict (for results rows and logs)."""
    defaults = type(config)()
    return {k: v for k, v in dataclasses.asdict(config).items() if getattr(defaults, k) != v}
