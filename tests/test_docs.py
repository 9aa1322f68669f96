"""Every command of the docs runs as written: each `resnet-pipe submit | jobs show | data preview
| study` line of README.md and docs/ (continuation lines joined) parses with the command's own
options, and its job (a study's every job) loads through the job loader with its --set values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli.main import data_preview, jobs_show, submit
from pipeline.cli.study import study
from pipeline.config import load_job
from pipeline.study.plans import plan

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"submit": submit, "jobs show": jobs_show, "data preview": data_preview, "study": study}
LINE = re.compile(r"resnet-pipe (submit|jobs show|data preview|study) ([a-z0-9][a-z0-9-]*)\b")


def doc_commands() -> list[tuple[str, str]]:
    """(where, command line) for every job command in a code block of the docs."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines, in_fence = doc.read_text().splitlines(), False
        for number, line in enumerate(lines):
            if line.strip().startswith("```"):
                in_fence = not in_fence
            code = in_fence or line.startswith("    ")
            if not code or not LINE.search(line):
                continue
            text, following = line, number
            while text.rstrip().endswith("\\"):
                following += 1
                text = text.rstrip()[:-1] + " " + lines[following].strip()
            found.append((f"{doc.name}:{number + 1}", text[LINE.search(text).start() :].split(" #")[0]))
    return found


def test_the_docs_have_job_commands() -> None:
    assert len(doc_commands()) >= 6  # the quick start, recipes, deployment


@pytest.mark.parametrize("where, line", doc_commands(), ids=[w for w, _ in doc_commands()])
def test_every_job_command_in_the_docs_loads(where: str, line: str) -> None:
    words = shlex.split(line)[1:]  # without `resnet-pipe`
    name = next(n for n in COMMANDS if words[: len(n.split())] == n.split())
    args = [w for w in words[len(name.split()) :] if not w.startswith("[")]
    context = COMMANDS[name].make_context(name, args)  # the command's own parser: unknown flags fail
    if name == "study":
        chosen = plan(context.params["name"], context.params["scale"], context.params["dataset"])
        for member in chosen.members:
            load_job(member.job, [*chosen.settings, *context.params["overrides"], *member.overrides])
        return
    load_job(context.params["job_name"] if "job_name" in context.params else context.params["name"],
             context.params["overrides"])  # fmt: skip
