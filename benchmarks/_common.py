"""Plumbing shared by the benchmark scripts: logging, markdown tables, rewriting a marked section of a
markdown file (README.md, RESULTS.md), and the load guard for timings.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder first on ``sys.path``, so they
import this module as ``_common``; benchmark scripts never import each other through ``sys.path`` edits.

One marker syntax for every rewritten section::

    <!-- key:begin -->
    ... written by a script ...
    <!-- key:end -->
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def log(msg: str, tag: str = "") -> None:
    """One timestamped progress line, flushed at once (benchmarks run for minutes)."""
    prefix = f"[{tag}] " if tag else ""
    print(f"[{time.strftime('%H:%M:%S')}] {prefix}{msg}", flush=True)


def markdown_table(rows: Iterable[Mapping[str, Any]] | Any, columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table from dict rows or a pandas DataFrame (its columns, in order)."""
    if hasattr(rows, "itertuples"):  # a DataFrame
        columns = list(rows.columns) if columns is None else list(columns)
        body = [list(r) for r in rows[columns].itertuples(index=False)]
    else:
        rows = list(rows)
        columns = list(columns if columns is not None else (rows[0].keys() if rows else []))
        body = [[r.get(c, "") for c in columns] for r in rows]
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in body]
    return "\n".join(lines)


def markers(key: str) -> tuple[str, str]:
    """The begin and end markers of section ``key``."""
    return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def rewrite_section(path: str | Path, key: str, text: str, *, header: str | None = None) -> None:
    """Replace section ``key`` of the markdown file ``path`` by ``text`` (markers kept).

    Without ``header`` the file must hold the section exactly once (a README is never extended silently);
    with it, a missing file starts as ``header`` and a missing section is appended.
    """
    path = Path(path)
    begin, end = markers(key)
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if old is None:
        if header is None:
            raise SystemExit(f"{path} not found; it must hold a {begin} ... {end} section")
        old = header
    block = f"{begin}\n{text.strip()}\n{end}"
    count = old.count(begin)
    if count == 0 and header is not None:
        new = old.rstrip() + "\n\n" + block + "\n"
    elif count == 1 and old.count(end) == 1:
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        new = pattern.sub(lambda _: block, old)
    else:
        raise SystemExit(f"{path} must hold exactly one {begin} ... {end} section")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# load guard: timings taken on a busy machine are not results
# ------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="write the results table even when the machine is loaded (then labelled so)")


def load_label(force: bool, load: float | None = None, cores: int | None = None) -> str:
    """``""`` on a machine whose 1-minute load average is at most its usable cores; above that a
    SystemExit (timings there measure the other processes), or with ``force`` the label the table carries:
    ``taken under load (load X on N cores)``. ``load``/``cores`` default to this machine's."""
    load = os.getloadavg()[0] if load is None else float(load)
    cores = usable_cores() if cores is None else int(cores)
    if load <= cores:
        return ""
    label = f"taken under load (load {load:.2f} on {cores} cores)"
    if not force:
        raise SystemExit(f"refusing to write a results table: 1-minute load {load:.2f} is above the {cores} usable "
                         "cores, so the timings measure the other processes; wait for an idle machine or pass "
                         "--force (the table is then labelled as " + repr(label) + ")")
    return label


def labelled(text: str, label: str) -> str:
    """``text`` with the load label (when any) as its first line."""
    return f"**{label}**\n\n{text}" if label else text
