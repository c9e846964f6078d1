"""Command lines of the Hydra apps, as users type them, made into overrides Hydra's grammar accepts.

Hydra's override grammar refuses an unquoted ``=`` in a value, so a policy spec with parameters
(``scheduler.eviction=ttl:ttl=5``) would have to be typed ``'scheduler.eviction="ttl:ttl=5"'``.
`hydra_overrides` quotes such values before Hydra reads them; every override Hydra already parses
is passed through untouched (sweeps, lists, interpolations, flags). Each app calls `fix_sys_argv()`
before its ``@hydra.main`` function:

    if __name__ == "__main__":
        fix_sys_argv()
        main()
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection, Iterable

# The last key of an override that holds a policy spec ("name" or "name:key=value,...").
POLICY_SPEC_KEYS = frozenset({"ordering", "eviction", "preemption", "router", "admission"})
# One parameter of a spec continuing after a comma: "margin=1" in "pause_aware:reload_s_per_token=1,margin=1".
_SPEC_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^:,]*$")
_UNQUOTABLE = set("'\"[]{}(),\\")


def split_spec_sweep(value: str) -> list[str]:
    """Splits a comma list of policy specs into specs: "lru,ttl:ttl=5,pause_aware:a=1,b=2" gives
    ["lru", "ttl:ttl=5", "pause_aware:a=1,b=2"] (a piece "key=value" continues the spec before it)."""
    specs: list[str] = []
    for piece in value.split(","):
        if specs and ":" in specs[-1] and _SPEC_PARAM.match(piece):
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
    except HydraException:
        return False
    return True


def _quote(text: str, allowed: str = "") -> str:
    """'text' when it holds "=" and nothing that would need escaping (beyond `allowed`)."""
    return f"'{text}'" if "=" in text and not (_UNQUOTABLE - set(allowed)) & set(text) else text


def hydra_override(arg: str, existing: Collection[str] = (), mappings: Collection[str] = ()) -> str:
    """One command-line argument as Hydra should read it.

    Args:
        arg: an argument as typed, e.g. "scheduler.eviction=ttl:ttl=30".
        existing: dotted keys the app's schema always has; "+key=value" for one of them is read as
            "key=value" (Hydra refuses to add a key that exists).
        mappings: dotted keys of the schema's open mappings (default {}); "key={a: 1}" and
            "key.a=1" are read as "++key..." (struct mode refuses a new key in a mapping otherwise).

    Returns:
        The argument, with values Hydra's grammar would refuse quoted ("scheduler.eviction='ttl:ttl=30'").
    """
    if arg.startswith("-") or "=" not in arg:
        return arg
    key, _, value = arg.partition("=")
    bare = key.lstrip("+")
    if not key.startswith("++") and any(bare == m or bare.startswith(m + ".") for m in mappings):
        key = "++" + bare
    elif key.startswith("+") and not key.startswith("++") and bare in existing:
        key = bare
    arg = f"{key}={value}"
    if _parses(arg) or value[:1] in ("'", '"'):
        return arg
    name = key.lstrip("+~").split("@")[0].rsplit(".", 1)[-1]
    if name in POLICY_SPEC_KEYS:
        fixed = f"{key}=" + ",".join(_quote(spec, allowed=",") for spec in split_spec_sweep(value))
    else:
        fixed = f"{key}={_quote(value)}"
    return fixed if _parses(fixed) else arg  # unfixable: Hydra reports the argument as typed


def hydra_overrides(args: Iterable[str], existing: Collection[str] = (), mappings: Collection[str] = ()) -> list[str]:
    """`hydra_override` of every argument."""
    return [hydra_override(arg, existing, mappings) for arg in args]


def fix_sys_argv(existing: Collection[str] = (), mappings: Collection[str] = ()) -> None:
    """Rewrites sys.argv[1:] with `hydra_overrides`, for the ``@hydra.main`` function called next."""
    sys.argv[1:] = hydra_overrides(sys.argv[1:], existing, mappings)
