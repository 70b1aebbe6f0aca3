"""README.md stays true to the code: every command it shows parses with the options that
exist, and every file it links to is in the repository."""
import os
import re
import shlex
import subprocess

import pytest

import common
import finetuner
import trainer
from bench import checkpoint_cost, frontier, packing, throughput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
SCRIPTS = {"trainer.py": trainer.GROUPS, "finetuner.py": finetuner.GROUPS, "bench.throughput": {"bench": throughput.BenchConfig},
           "bench.packing": {"bench": packing.PackingConfig}, "bench.frontier": {"frontier": frontier.FrontierConfig},
           "bench.checkpoint_cost": {"bench": checkpoint_cost.CheckpointConfig}}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, its arguments) of every python/torchrun command in README's code blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            for i, w in enumerate(words):
                name = w[:-3].replace("/", ".") if w.endswith(".py") else (words[i + 1] if w == "-m" and i + 1 < len(words) else w)
                if name in SCRIPTS or w in SCRIPTS:
                    found.append((w if w in SCRIPTS else name, words[i + 2 if w == "-m" else i + 1:]))
                    break
    return found


@pytest.mark.parametrize("script,args", readme_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_every_readme_command_parses(script, args):
    if script == "finetuner.py":
        if args[:1] == ["--score-squad"]:
            return  # argparse's own command, shown with placeholders
        i = args.index("--task")
        assert args[i + 1] in finetuner.TASKS
        args = args[:i] + args[i + 2:]
    flags = trainer.FLAGS if script == "trainer.py" else None
    common.parse_overrides(args, SCRIPTS[script], flags)  # an unknown option or a bad value exits
    if script == "trainer.py":
        if "--train.resume" in args:  # resuming reads a checkpoint; the rest of the command must parse alone
            i = args.index("--train.resume")
            args = args[:i] + args[i + 2:]
        trainer.parse_args(args)


def test_readme_shows_the_main_commands_and_links_existing_files():
    scripts = {s for s, _ in readme_commands()}
    assert {"trainer.py", "finetuner.py", "bench.packing", "bench.throughput"} <= scripts
    assert ("trainer.py", ["--demo"]) in readme_commands()
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, link)), link


def test_gitignore_keeps_downloads_out_and_records_logs_in():
    """Run logs and downloaded data stay out of git; a record's own logs/ folder is committable."""
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    paths = {"logs/run.txt": True, "data/blimp/blimp.jsonl": True, "data/pydoc/pydoc_val_000000.bin": True,
             "records/2026-11-29-cpu-compare/logs/kbert.txt": False}
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert {p: p in r.stdout.splitlines() for p in paths} == paths


def test_quoted_log_lines_are_verbatim_from_the_linked_records():
    """Every run output line README quotes (step, validation, checkpoint, export lines) is in
    the log of a record README links to, character for character (once the step:50 line said
    train_time:64926ms where the demo's log has 60358ms)."""
    records = {os.path.dirname(link) for link in re.findall(r"\]\((records/[^)#]+)\)", README)}
    logs = "".join(open(os.path.join(ROOT, r, name)).read() for r in sorted(records)
                   for name in os.listdir(os.path.join(ROOT, r)) if name.endswith((".log", ".txt")))
    quoted, fenced = [], False
    for line in README.splitlines():
        fenced ^= line.startswith("```")
        if fenced and re.match(r"(step:\d+|exported |next: )", line):
            quoted.append(line)
    assert len(quoted) >= 6
    assert [line for line in quoted if line not in logs.splitlines()] == []
