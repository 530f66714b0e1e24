"""Run the README's audit demo on a fresh synthetic cohort and write what it printed.

    python tools/readme_audit_demo.py            # runs the commands (a few minutes on 2 cores), then
                                                 # writes benchmarks/AUDIT_DEMO.md and the README block

The commands are the README's, run as they stand in a temporary folder (relative paths, as a reader types
them); each command's standard output becomes ``# `` lines under it. ``benchmarks/AUDIT_DEMO.md`` records the
block with the date, machine and divaware version; the README's block between the ``audit-demo`` markers is
replaced by the same text, and ``tests/test_user_errors.py`` checks that both agree, so the README never
shows numbers that no run printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RECORD = REPO / "benchmarks" / "AUDIT_DEMO.md"
BEGIN, END = "<!-- audit-demo:begin -->", "<!-- audit-demo:end -->"
COMMANDS = [
    "divaware synth --out data/synth",
    "python -c \"from divaware.audit import demo_predictions; demo_predictions('data/synth', "
    "'my_model/predictions', itemset='age_group=0-40')\"",
    "divaware audit --data data/synth --predictions my_model/predictions --split test --out audits/my_model",
    "divaware audit --data data/synth --predictions my_model/predictions --split train --out audits/my_model_train",
    "divaware weights --audit audits/my_model_train --out weights.csv",
]
SHOWN = {0: False, 1: False}
"""Commands whose output the README leaves out (the synthetic generator's and the demo's progress lines)."""


def run_demo() -> str:
    """The README block: each command, then its standard output as ``# `` lines."""
    lines = ["```bash"]
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "DIVAWARE_PREPROCESSED": str(Path(work) / "store"), "PYTHONWARNINGS": "ignore"}
        for i, command in enumerate(COMMANDS):
            argv = shlex.split(command)
            if argv[0] == "divaware":
                argv = [sys.executable, "-m", "divaware", *argv[1:]]
            elif argv[0] == "python":
                argv = [sys.executable, *argv[1:]]
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{command} failed ({done.returncode}):\n{done.stderr[-2000:]}")
            lines.append(command)
            if SHOWN.get(i, True):
                lines += [f"# {line}" for line in done.stdout.splitlines() if line.strip()]
    lines.append("```")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """The block between the markers of ``text`` (README or record)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def null_share(block: str) -> int:
    """The test audit's null-check share (%), as the block prints it."""
    found = re.search(r"noise alone flags something in (\d+)% of", block)
    if not found:
        raise ValueError("the block prints no null check")
    return int(found.group(1))


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from divaware import __version__

    start = time.time()
    block = run_demo()
    took = time.time() - start
    RECORD.write_text(
        "# The README's audit demo, as it ran\n\n"
        f"Written by `python tools/readme_audit_demo.py` on {time.strftime('%Y-%m-%d')} in {took:.0f} s: divaware "
        f"{__version__}, Python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPU(s). The "
        "README shows the block below; a test checks that the two agree.\n\n"
        f"{BEGIN}\n{block}\n{END}\n", encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = f"{head}{BEGIN}\n{block}\n{END}{tail}"
    text = re.sub(r"flags something on this many cases; here \d+ %", f"flags something on this many cases; here "
                  f"{null_share(block)} %", text)
    README.write_text(text, encoding="utf-8")
    print(f"{RECORD.relative_to(REPO)} and the README block written ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
