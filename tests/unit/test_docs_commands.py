"""Every command line in the docs parses with the CLI, and every number README quotes with a
command says when it was measured.

Command lines are the lines of fenced shell blocks (```, ```bash, ```sh, ```console) in
README.md, docs/*.md and the READMEs of launch/, cluster/ and datasets/ that start with
``distnet``, ``./dev``, ``mpiexec``, ``python -m distnet`` or ``sbatch`` (after any
``NAME=value`` settings). Each is parsed by the argparse parser that would parse it, nothing
runs: the parser's ``parse_args`` is stopped right after it returns. A command inside another
(``distnet launch -np 2 -- distnet train ...``, ``mpiexec -n 2 python -m ...``,
``sbatch FILE distnet ...``) is parsed too; scripts named by path must exist.

Dates: a README table row or paragraph that shows a command in backticks beside a measured
number (seconds, a ratio, a percentage, a rate) carries the date it was measured, as
``2026-12-07`` (the convention: ``(2026-12-07, 2 cores, load 3)`` or a "measured" column).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from distnet import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS += [ROOT / d / "README.md" for d in ("launch", "cluster", "datasets")]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
STARTS = ("distnet", "./dev", "mpiexec", "python", "python3", "sbatch")


def shell_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every command line in the file's fenced shell blocks,
    backslash continuations joined and a leading ``$ `` prompt dropped."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence is None or fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        pending += stripped.removeprefix("$ ")
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words = _words(pending)
        if words and words[0] in STARTS:
            out.append((start, pending))
        pending = ""
    return out


def _words(command: str) -> list[str]:
    """The command's words without comments and leading ``NAME=value`` settings."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # not shell (a TOML or Python line in an unlabelled block)
        return []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return words


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def _stopping_parse_args(original):
    def parse_args(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        if self.prog == "distnet bench":  # dispatches: the benchmark's own parser comes next
            return parsed
        raise _Parsed(parsed)

    return parse_args


def check_command(words: list[str], where: str) -> None:
    """Parses ``words`` as its program would, recursing into a command it carries."""
    program, rest = words[0], words[1:]
    if program == "./dev":
        assert rest and rest[0] in ("demo", "test", "setup"), f"{where}: ./dev {rest}"
        if rest[0] == "demo":
            check_command(["distnet", "demo", *rest[1:]], where)
        return
    if program == "mpiexec":  # its own options, then the program it starts
        starts = [i for i, w in enumerate(rest) if w in ("distnet", "python", "python3")]
        assert starts, f"{where}: mpiexec starts no distnet or python program"
        check_command(rest[starts[0] :], where)
        return
    if program == "sbatch":
        script = next(w for w in rest if not w.startswith("-"))
        assert (ROOT / script).is_file(), f"{where}: no such batch script {script}"
        inner = rest[rest.index(script) + 1 :]
        if inner and inner[0] == "distnet":
            check_command(inner, where)
        return
    if program in ("python", "python3"):
        if rest[:1] == ["-m"]:
            module = importlib.import_module(rest[1])
            _parse(module.main, rest[2:], where)
        elif rest[:1] == ["-c"]:
            compile(rest[1], where, "exec")  # an inline program: it must at least be Python
        else:
            assert (ROOT / rest[0]).is_file(), f"{where}: no such script {rest[0]}"
        return
    namespace = _parse(cli.main, rest, where)
    if rest[:1] == ["train"] and namespace is not None:
        check_job_overrides(namespace, where)
    inner = getattr(namespace, "command", None) if rest[:1] == ["launch"] else None
    if inner:
        inner = inner[1:] if inner[0] == "--" else inner
        check_command(inner, where)


def check_job_overrides(args: argparse.Namespace, where: str) -> None:
    """The job a ``distnet train`` line names, with its --set, --engine, --out and Ray options
    laid over it, passes the job spec (the example file where it exists, else the defaults)."""
    from distnet.train.jobs import jobspec
    from distnet.train.jobs.arguments import dist_overrides
    from distnet.train.jobs.job import load_job

    overrides: dict = {"run": {"out": args.out}} if args.out else {}
    ray_keys = dist_overrides(args) | ({"engine": args.engine} if args.engine else {})
    overrides = jobspec.merge(overrides, {"dist": ray_keys} if ray_keys else {})
    job = ROOT / args.job.removeprefix("~/distnet/")
    try:
        for text in args.set:
            section, key, value = jobspec.parse_override(text)
            overrides = jobspec.merge(overrides, {section: {key: value}})
        if job.is_file():
            load_job(job, overrides)
        else:  # a placeholder (job.toml): the overrides over the defaults
            jobspec.validate(jobspec.merge({}, overrides), args.job)
    except jobspec.JobError as e:
        raise AssertionError(f"{where}: the job does not pass the spec: {e}") from None


def _parse(main, argv: list[str], where: str) -> argparse.Namespace | None:
    """Runs ``main(argv)`` until its parser returns; None for --help/--version paths."""
    try:
        code = main(argv)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:  # argparse: --help exits 0, a bad option 2
        assert e.code in (0, None), f"{where}: does not parse (exit {e.code})"
        return None
    assert code == 0, f"{where}: exit {code} before any parser ran"
    return None


COMMANDS = [
    (f"{path.relative_to(ROOT)}:{number}", command)
    for path in DOCS
    if path.exists()
    for number, command in shell_commands(path)
]


def test_the_docs_have_command_lines_to_check():
    assert len(COMMANDS) >= 25
    assert {"README.md"} <= {where.split(":")[0] for where, _ in COMMANDS}


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_line_parses(where, command, monkeypatch, capsys):
    monkeypatch.setattr(
        argparse.ArgumentParser,
        "parse_args",
        _stopping_parse_args(argparse.ArgumentParser.parse_args),
    )
    try:
        check_command(_words(command), f"{where}: {command}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{capsys.readouterr().err}") from None


def test_a_wrong_option_is_caught(monkeypatch):
    monkeypatch.setattr(
        argparse.ArgumentParser,
        "parse_args",
        _stopping_parse_args(argparse.ArgumentParser.parse_args),
    )
    for words in (
        ["distnet", "train", "job.toml", "--workerz", "2"],
        ["distnet", "launch", "-np", "2", "--", "distnet", "train"],  # JOB missing
        ["distnet", "bench", "core", "--workload", "nope"],
        ["./dev", "demo", "--epochs", "many"],
        ["python", "-m", "distnet.train.jobs.jobsdoc", "--chek", "x"],
        ["distnet", "nosuchcommand"],
        ["distnet", "train", "job.toml", "--set", "pretrain.epochz=5"],
        ["distnet", "train", "launch/jobs/digits_sae.toml", "--set", "dist.shards=2"],
    ):
        with pytest.raises(AssertionError):
            check_command(words, " ".join(words))


# -- dates ------------------------------------------------------------------------------------

COMMAND_SPAN = re.compile(r"`(?:[A-Z_]+=\S+ )*(?:distnet|\./dev|mpiexec|python)\b[^`]*`")
MEASURED = re.compile(
    r"(?<![\w.-])\d[\d,]*(?:\.\d+)?\s?(?:s|ms|us|x|%|GB/s|samples/s|updates/s)(?![\w])"
)
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def quoted_measurements(text: str) -> list[str]:
    """Table rows and paragraphs (outside code blocks) that show a command beside a
    measured number and give no date."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    units = [row for row in text.splitlines() if row.startswith("|")]
    units += [p for p in re.split(r"\n\s*\n", text) if not p.lstrip().startswith("|")]
    undated = []
    for unit in units:
        if not COMMAND_SPAN.search(unit):
            continue
        outside = COMMAND_SPAN.sub("", unit)
        if MEASURED.search(outside) and not DATE.search(unit):
            undated.append(unit.strip()[:160])
    return undated


def test_every_number_quoted_with_a_command_in_readme_is_dated():
    assert quoted_measurements((ROOT / "README.md").read_text()) == []


def test_the_date_check_sees_an_undated_number():
    row = "| MLP step | `distnet bench core --workload mlp` | 1.07x PyTorch |"
    assert quoted_measurements(row) and not quoted_measurements(row[:-1] + " 2026-12-07 |")
    prose = "`./dev demo` took 27 s.\n\nNo command here: 5 s."
    assert quoted_measurements(prose) == ["`./dev demo` took 27 s."]


# -- what --help says -------------------------------------------------------------------------


def test_distnet_help_names_every_benchmark(capsys):
    from distnet.bench import BENCHMARKS

    assert cli.main(["--help"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "bench " in line]
    assert [name for name in BENCHMARKS if name not in line] == []


def test_bench_core_says_what_it_compares_with():
    """`distnet bench core` races a hand-written numpy step and, when importable, PyTorch."""
    from distnet.bench import BENCHMARKS, step, step_contenders

    described = BENCHMARKS["core"][1] + step.__doc__.split("\n\n")[0]
    assert "numpy" in described and "PyTorch" in described
    mlp = step_contenders.CONTENDERS["mlp"]
    assert "torch" in mlp and "numpy" in mlp


def test_ci_runs_the_test_command_of_readmes_quick_start():
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ")[0]
    assert "./dev test" in quick_start
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1].split("#")[0].strip() == 'exec ./dev test "$@"'  # with CI's own options


# -- links ------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file (or heading anchor) does not exist."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    return broken


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_sees_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Two words\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#two-words) [x](a.md#nope) [y](gone.md) [z](https://x.org/q)\n")
    assert broken_links(page) == ["a.md#nope", "gone.md"]
