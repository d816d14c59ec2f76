"""What the docs say must be true: every command in README.md, the reference pages in docs/ and
BENCHMARKS.md names a module that exists and only flags (and choice values) that module's parser
accepts; every relative link and image in README.md and docs/ points at a file (and heading) that
exists; the README stays a front page of at most 200 lines.

Commands are read from fenced code blocks and inline code spans, in the forms the docs use:
``python -m MODULE ...``, ``./run.sh ...`` (the pipeline), ``bench/gpu_check.sh ...``,
``launch/{cpu,gpu,tpu,slurm}.sh STAGE ...`` and ``python -m launch [--platform P] STAGE ...``
(STAGE's module), also inside a quoted ``--command "..."``. Each module's flags come from its own
``--help``, printed in this process: each module is imported once per test module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ("README.md", *sorted(f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")))
"""The front page and the reference pages: commands, flags and links checked."""
DOCS = (*PAGES, "BENCHMARKS.md")
README_MAX_LINES = 200
SCRIPTS = {"run.sh": "launch.pipeline", "bench/gpu_check.sh": "bench.gpu_check",
           "bench/saelens_synth.py": "bench.saelens_synth"}
LAUNCHERS = ("launch/cpu.sh", "launch/gpu.sh", "launch/tpu.sh", "launch/slurm.sh")
SEPARATORS = {"&", "&&", "|", "||", ";"}


@dataclasses.dataclass(frozen=True)
class Command:
    """One documented command: the module it runs and the tokens after it."""

    module: str
    args: tuple[str, ...]
    where: str
    error: str | None = None
    """Why the command cannot run at all (an unknown launcher stage)."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One option string of a parser; ``choices`` when it takes one value from a fixed set."""

    name: str
    choices: tuple[str, ...] | None


def snippets(markdown: str) -> list[tuple[int, str, bool]]:
    """(line number, text, inline) of each fenced block's logical line (``\\`` continuations
    joined) and each inline code span outside fenced blocks (a span may wrap onto the next lines
    of its paragraph; its number is the line it starts on)."""
    found, fenced, pending, start = [], False, "", 0
    paragraph: list[tuple[int, str]] = []
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```") or not line.strip():
            found += _inline_spans(paragraph)
            paragraph = []
            fenced ^= line.lstrip().startswith("```")
            continue
        if fenced:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((start, pending + line, False))
            pending = ""
        else:
            paragraph.append((number, line))
    return found + _inline_spans(paragraph)


def _inline_spans(paragraph: list[tuple[int, str]]) -> list[tuple[int, str, bool]]:
    """The code spans of one paragraph's lines, joined with spaces across line breaks."""
    text, starts = "", []
    for number, line in paragraph:
        starts.append((len(text), number))
        text += line + " "
    line_at = lambda offset: max(n for at, n in starts if at <= offset)
    return [(line_at(m.start()), " ".join(m.group(1).split()), True) for m in re.finditer(r"`([^`]+)`", text)]


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose or Python: words are enough
        return text.split("#")[0].split()


def _stage(tokens: list[str], i: int, launch_modules: dict[str, str], where: str):
    """The command a launcher form starts at ``tokens[i]`` (its STAGE), or None for a placeholder."""
    if i < len(tokens) and tokens[i].split("=")[0] == "--platform":
        i += 1 if "=" in tokens[i] else 2
    if i >= len(tokens) or tokens[i] in ("-h", "--help") or tokens[i].isupper() or tokens[i] == "...":
        return None, i
    stage = tokens[i]
    if stage not in launch_modules:
        return Command("launch", (), where, f"python -m launch has no stage {stage}"), i + 1
    return Command(launch_modules[stage], (), where), i + 1


def commands_in(text: str, where: str, launch_modules: dict[str, str]) -> list[Command]:
    """Every command in one shell line, with the tokens up to the next separator."""
    tokens, found, i = _split(text), [], 0
    while i < len(tokens):
        token, command = tokens[i], None
        if any(c.isspace() for c in token):  # a quoted command line, e.g. ssh --command "..."
            found += commands_in(token, where, launch_modules)
        if re.fullmatch(r"(.*/)?python[0-9.]*|\S*\$\{PYTHON\S*", token) and tokens[i + 1:i + 2] == ["-m"] \
                and i + 2 < len(tokens):
            module, i = tokens[i + 2], i + 3
            if module == "launch":
                command, i = _stage(tokens, i, launch_modules, where)
            else:
                command = Command(module, (), where)
        elif token.removeprefix("./") in SCRIPTS:
            command, i = Command(SCRIPTS[token.removeprefix("./")], (), where), i + 1
        elif token.removeprefix("./") in LAUNCHERS:
            command, i = _stage(tokens, i + 1, launch_modules, where)
        else:
            i += 1
            continue
        args = []
        while i < len(tokens) and tokens[i] not in SEPARATORS:
            args.append(tokens[i])
            i += 1
            if args[-1].endswith(";"):
                break
        if command is not None:
            found.append(dataclasses.replace(command, args=tuple(args)))
    return found


def commands(markdown: str, name: str, launch_modules: dict[str, str]) -> list[Command]:
    return [cmd for number, text, _ in snippets(markdown) for cmd in commands_in(text, f"{name}:{number}", launch_modules)]


def options_from_help(help_text: str) -> dict[str, Option]:
    """The option strings of argparse's ``--help``: the invocation column of its options section."""
    options, section = {}, False
    for line in help_text.splitlines():
        if re.fullmatch(r"(options|optional arguments):", line):
            section = True
        elif section and re.match(r"  -", line):
            invocation = line.strip().split("  ")[0]
            braces = re.search(r"\{([^}]*)\}", invocation)
            for name in re.findall(r"--[\w-]+", invocation):
                options[name] = Option(name, tuple(braces.group(1).split(",")) if braces else None)
    return options


def module_exists(module: str) -> bool:
    """``python -m module`` would find something to run."""
    try:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{module}.__main__")
    except (ImportError, ValueError):
        return False
    return spec is not None


def help_of(module: str) -> str:
    """``python -m module --help``'s output, produced in this process by the module's ``main``."""
    target = importlib.import_module(module)
    if hasattr(target, "__path__"):
        target = importlib.import_module(f"{module}.__main__")
    out = io.StringIO()
    takes_argv = bool(inspect.signature(target.main).parameters)
    with mock.patch.object(sys, "argv", [f"python -m {module}", "--help"]), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as exit_:
            target.main(["--help"]) if takes_argv else target.main()
    assert exit_.value.code in (0, None), f"{module} --help exited with {exit_.value.code}"
    return out.getvalue()


def problems_of(cmd: Command, options_of) -> list[str]:
    """What is wrong with one documented command: its module, unknown flags, values not among
    the flag's choices."""
    if cmd.error:
        return [f"{cmd.where}: {cmd.error}"]
    if not module_exists(cmd.module):
        return [f"{cmd.where}: no module {cmd.module}"]
    options, problems = options_of(cmd.module), []
    for i, arg in enumerate(cmd.args):
        if " " in arg:  # a quoted value; the trainer flags a benchmark passes on are the trainer's
            if i and cmd.args[i - 1] == "--train_args":
                inner = Command("jax_sae.train", tuple(arg.split()), cmd.where)
                problems += problems_of(inner, options_of)
            continue
        if not arg.lstrip("[").startswith("--"):
            continue
        name, _, inline = arg.lstrip("[").rstrip("]").partition("=")
        if name not in options:
            problems.append(f"{cmd.where}: python -m {cmd.module} has no flag {name}")
            continue
        value = inline or (cmd.args[i + 1].rstrip("]") if i + 1 < len(cmd.args) else "")
        choices = options[name].choices
        if choices and value and not value.startswith(("-", "$")) and value not in choices:
            problems.append(f"{cmd.where}: {name} {value} is not one of {', '.join(choices)}")
    return problems


def unknown_prose_flags(markdown: str, name: str, launch_modules: dict[str, str], options_of) -> list[str]:
    """Flags in inline code spans that no documented module, launcher stage or the launcher has."""
    modules = set(launch_modules.values()) | {cmd.module for cmd in commands(markdown, name, launch_modules)}
    known = {"--platform"}.union(*(options_of(module) for module in modules if module_exists(module)))
    return [f"{name}:{number}: {flag} in `{span}`" for number, span, inline in snippets(markdown) if inline
            for flag in re.findall(r"(?<![\w=-])--[a-z][\w-]*", span) if flag not in known]


@pytest.fixture(scope="module")
def launch_modules() -> dict[str, str]:
    from launch.__main__ import MODULES

    return MODULES


@pytest.fixture(scope="module")
def options_of():
    """module -> its options, each module's ``--help`` produced once for the whole test module."""
    cache: dict[str, dict[str, Option]] = {}

    def get(module: str) -> dict[str, Option]:
        if module not in cache:
            cache[module] = options_from_help(help_of(module))
        return cache[module]

    return get


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_use_real_modules_and_flags(doc, launch_modules, options_of):
    found = commands((REPO / doc).read_text(), doc, launch_modules)
    assert found or doc.startswith("docs/"), f"no commands found in {doc}"  # a reference page may have none
    problems = [p for cmd in found for p in problems_of(cmd, options_of)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_flags_named_in_prose_exist(doc, launch_modules, options_of):
    """A flag the text names on its own (`--keep_uncond`, `--backward auto|sparse|dense`) is a
    flag of some entry point: of a documented command's module, a launcher stage's, or the
    launcher's own ``--platform``."""
    text = (REPO / doc).read_text()
    unknown = unknown_prose_flags(text, doc, launch_modules, options_of)
    assert not unknown, "\n".join(unknown)


def test_readme_commands_cover_every_form(launch_modules):
    """The parser sees the commands of the README and docs/ together in every form they use, not
    just a few: each stage's module, the pipeline, the GPU check, and a launcher inside gcloud's
    quoted ``--command``."""
    found = [cmd for page in PAGES for cmd in commands((REPO / page).read_text(), page, launch_modules)]
    modules = {cmd.module for cmd in found}
    assert {"extractor.prompts", "extractor.extract", "jax_sae.train", "discovery.discover", "discovery.report",
            "jax_sae.export", "extractor.evaluate", "extractor.steer", "launch.pipeline", "bench.gpu_check"} <= modules
    tpu = [cmd for cmd in found if cmd.module == "jax_sae.train" and "--mesh_model" in cmd.args
           and "262144" in cmd.args]
    assert tpu, "the launcher inside gcloud's --command was not read"


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"


@pytest.mark.parametrize("page", [page for page in PAGES if page.startswith("docs/")])
def test_each_reference_page_has_a_title_and_leads_back_to_the_readme(page):
    lines = [line for line in (REPO / page).read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page} does not start with a title"
    assert "](../README.md)" in lines[1], f"{page}'s second line does not link back to the README"


MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of each markdown link and image outside code whose target is in the
    repo (not a URL): ``[text](docs/store.md)``, ``![alt](report-index.png)``, ``[x](#tests)``."""
    found, fenced = [], False
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in MARKDOWN_LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                found.append((number, target))
    return found


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = [line.lstrip("#").strip() for line in re.sub(r"```.*?```", "", markdown, flags=re.S).splitlines()
                if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(page: Path, repo: Path = REPO) -> list[str]:
    """Relative links of one page whose file, or heading after ``#``, does not exist."""
    problems = []
    for number, target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(repo)}:{number}: {target}"
        if not resolved.is_relative_to(repo.resolve()) or not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(repo)}")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_at_files_that_exist(page):
    problems = broken_links(REPO / page)
    assert not problems, "\n".join(problems)


def test_readme_links_every_reference_page():
    linked = {target for _, target in relative_links((REPO / "README.md").read_text())}
    missing = [page for page in PAGES if page.startswith("docs/") and page not in linked]
    assert not missing, f"README.md links no {', '.join(missing)}"


def test_link_checker_reports_missing_files_and_headings(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.png").write_bytes(b"")
    (tmp_path / "README.md").write_text("# Top\n\n## The real run: `x`\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("\n".join([
        "# Page",
        "[back](../README.md) [run](../README.md#the-real-run-x) ![shot](a.png) [web](https://example.com)",
        "[gone](missing.md) ![gone](b.png) [bad anchor](../README.md#nowhere) [here](#page) [not here](#other)",
        "`[in code](nowhere.md)` and a fence:",
        "```",
        "[in a fence](nowhere.md)",
        "```",
    ]))
    assert broken_links(page, tmp_path) == [
        "docs/page.md:3: missing.md: no such file",
        "docs/page.md:3: b.png: no such file",
        "docs/page.md:3: ../README.md#nowhere: no heading #nowhere in README.md",
        "docs/page.md:3: #other: no heading #other in docs/page.md",
    ]


def test_checker_reports_made_up_flags_modules_stages_and_choices(launch_modules, options_of):
    snippet = "\n".join([
        "```bash",
        "python -m jax_sae.export --checkpoint models/x/best --format torch --out sae.pt   # fine",
        "python -m jax_sae.export --checkpoint models/x/best \\",
        "    --no_such_flag 1",
        "launch/gpu.sh export --format onnx --out x",
        "ssh host --command \"cd repo && launch/tpu.sh export --outt x\"",
        "python -m launch --platform gpu transmogrify --x 1",
        "python -m jax_sae.no_such_module --x 1",
        "python -m bench.quality_bench --train_args \"--lr 1e-3 --lr_shedule wsd --threshold sometimes\"",
        "```",
        "Inline too: `./run.sh --not_a_pipeline_flag 3`, and [--out] in brackets is read: "
        "`python -m jax_sae.export [--format saelens] [--bogus]`.",
    ])
    found = commands(snippet, "snippet", launch_modules)
    problems = [p for cmd in found for p in problems_of(cmd, options_of)]
    assert problems == [
        "snippet:3: python -m jax_sae.export has no flag --no_such_flag",
        "snippet:5: --format onnx is not one of torch, saelens",
        "snippet:6: python -m jax_sae.export has no flag --outt",
        "snippet:7: python -m launch has no stage transmogrify",
        "snippet:8: no module jax_sae.no_such_module",
        "snippet:9: python -m jax_sae.train has no flag --lr_shedule",
        "snippet:9: --threshold sometimes is not one of running, calibrated",
        "snippet:11: python -m launch.pipeline has no flag --not_a_pipeline_flag",
        "snippet:11: python -m jax_sae.export has no flag --bogus",
    ]
    assert unknown_prose_flags("Use `--format saelens` or `--formatt`.", "prose", launch_modules, options_of) == [
        "prose:1: --formatt in `--formatt`"]
