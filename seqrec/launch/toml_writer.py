"""Write a run config back to TOML (the stdlib reads TOML but cannot write it).

Only what `seqrec.config` holds is supported: nested tables of strings, ints, floats, bools and lists
of those. `config_delta` keeps the values that differ from the defaults, so a rendered config stays
short and reads as "what this run changes"; `load_config` on the result gives back the same RunConfig.

Example:
    dumps({"name": "x", "train": {"max_steps": 10}})  # 'name = "x"\\n\\n[train]\\nmax_steps = 10\\n'
"""

from __future__ import annotations

import json
import math
from typing import Any

from seqrec.config import ConfigError, RunConfig, to_dict


def config_delta(cfg: RunConfig) -> dict[str, Any]:
    """The nested dict of `cfg` values that differ from `RunConfig()` defaults."""
    return _delta(to_dict(cfg), to_dict(RunConfig()))


def _delta(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict):
            sub = _delta(value, default if isinstance(default, dict) else {})
            if sub:
                out[key] = sub
        elif value != default or type(value) is not type(default):
            out[key] = value
    return out


def dumps(data: dict[str, Any], table: str = "") -> str:
    """TOML text for a nested dict: scalars of a table first, then its sub-tables."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    lines = [f"[{table}]"] if table and scalars else []
    lines += [f"{_key(k)} = {_value(v, f'{table}.{k}' if table else k)}" for k, v in scalars]
    text = "\n".join(lines) + "\n" if lines else ""
    for key, sub in tables:
        sub_text = dumps(sub, f"{table}.{_key(key)}" if table else _key(key))
        if sub_text:
            text += ("\n" if text else "") + sub_text
    return text


def _key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _string(key)


def _string(text: str) -> str:
    # JSON escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL character.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v, key) for v in value) + "]"
    if value is None:
        raise ConfigError(f"{key} is None where the default is not: TOML has no null, set a value")
    raise TypeError(f"cannot write {type(value).__name__} for {key} as TOML")
