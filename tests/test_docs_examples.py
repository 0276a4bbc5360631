"""Every Python example in ``README.md`` and ``docs/*.rst`` runs as written.

The rules the documentation follows (and this module enforces):

* Examples are the ```` ```python ```` fences of ``README.md`` and the
  ``.. code-block:: python`` directives of ``docs/*.rst``.  Other spellings of a
  Python block (```` ```py ````, ``.. code::``, ``.. sourcecode::``,
  ``python3``...) are refused, so that no example escapes these tests.
* Each example is a program of its own, run in a fresh interpreter as a reader
  would run it, unless its first line is :data:`CONTINUES`: then it runs after
  the example before it on the same page, in the same program (the page reads
  as one session).
* An example whose first line is :data:`FRAGMENT` is not run (a line of Celery
  configuration has no meaning on its own).  It must still compile, and the
  list of fragments is pinned in :data:`FRAGMENTS`: adding one is a decision.
* An example that names an ``amqp://`` or ``amqps://`` URL (``carrot+amqp://``
  included) needs RabbitMQ: it runs in ``integration/test_docs_examples.py``
  against ``localhost:5672``.  Every other example runs here.
* A program must exit 0 within :data:`EXAMPLE_SECONDS`, must stop every
  :class:`~carrot_kombu.ConnectionManager` it started (the process-wide managers
  of the ``carrot+amqp://`` kombu transport excepted) and must not leave a lease
  or a manager to the garbage collector.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: First line of an example that is not run.
FRAGMENT = "# not runnable: configuration fragment"
#: First line of an example that continues the one before it on the same page.
CONTINUES = "# continues the example above"

#: The examples exempt from running: (page, first line after the marker), one per example.
FRAGMENTS = [
    ("README.md", 'broker_url = "carrot+amqp://user:pass@host:5672/vhost"   # in your Celery configuration'),
    ("docs/celery.rst", 'broker_url = "carrot+amqp://user:pass@host:5672/vhost"'),
    ("docs/celery.rst", "broker_transport_options = {"),
    ("docs/asyncio.rst", "from celery import Celery"),  # needs FastAPI, not a dependency
]

#: Most seconds one example program may take.
EXAMPLE_SECONDS = 15.0
#: Beyond this, the program is killed (and its output shown).
HARD_TIMEOUT = 90.0

_NEEDS_BROKER = re.compile(r"amqps?://")

#: Runs one example program; reports what it left behind on stderr.
RUNNER = r'''
import gc, json, logging, runpy, sys

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

_collect = _Collect()
logging.getLogger("carrot_kombu").addHandler(_collect)  # never imports carrot_kombu itself

# What each line of the example printed, so that the "# output" comments can be checked.
import builtins, io
_print = builtins.print
_printed = []
def _recording_print(*args, **kwargs):
    frame = sys._getframe(1)
    if frame.f_code.co_filename == sys.argv[1] and kwargs.get("file") is None:
        text = io.StringIO()
        _print(*args, **dict(kwargs, file=text))
        _printed.append([frame.f_lineno, text.getvalue()])
    _print(*args, **kwargs)
builtins.print = _recording_print
runpy.run_path(sys.argv[1], run_name="__main__")
builtins.print = _print
gc.collect()
unstopped = []
manager_module = sys.modules.get("carrot_kombu.manager")
if manager_module is not None:
    transport = sys.modules.get("carrot_kombu.transport")
    shared = [id(e.manager) for e in transport._registry.values()] if transport is not None else []
    unstopped = [repr(m) for m in list(manager_module._MANAGERS)
                 if m._core.supervisor is not None and id(m) not in shared]
print("DOCS-EXAMPLE-REPORT " + json.dumps({"unstopped": unstopped, "warnings": _collect.messages,
                                           "printed": _printed}),
      file=sys.stderr, flush=True)
'''


@dataclass(frozen=True)
class Block:
    """One Python example: where it is and its code."""

    page: str  # relative to the repository root
    line: int  # first line of the code (1-based)
    code: str

    @property
    def first_line(self) -> str:
        return self.code.lstrip("\n").splitlines()[0].strip() if self.code.strip() else ""

    @property
    def fragment(self) -> bool:
        return self.first_line == FRAGMENT

    @property
    def continues(self) -> bool:
        return self.first_line == CONTINUES

    @property
    def label(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Program:
    """One or more examples of a page that run together, in order."""

    blocks: tuple[Block, ...]

    @property
    def code(self) -> str:
        return "\n".join(block.code for block in self.blocks)

    @property
    def needs_broker(self) -> bool:
        return bool(_NEEDS_BROKER.search(self.code))

    @property
    def label(self) -> str:
        first, last = self.blocks[0], self.blocks[-1]
        return first.label if first is last else f"{first.label}-{last.line}"


# -- extraction ------------------------------------------------------------------------------

_MD_FENCE = re.compile(r"^```(\S*)[ \t]*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(code-block|code|sourcecode)::\s*(\S*)\s*$")
_PYTHON_NAMES = {"python", "py", "python3", "py3", "pycon", "ipython", "ipython3"}


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]


def _relative(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:  # a page outside the repository (the extractor's own tests)
        return path.as_posix()


def markdown_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opened = _MD_FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        language = opened.group(1)
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if language.lower() in _PYTHON_NAMES:
            if language != "python":
                raise AssertionError(f"{_relative(path)}:{index + 1}: write ```python, not ```{language}")
            yield Block(_relative(path), index + 2, "\n".join(lines[index + 1:end]) + "\n")
        index = end + 1


def rst_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    for index, text in enumerate(lines):
        found = _RST_DIRECTIVE.match(text)
        if found is None:
            continue
        indent, directive, language = len(found.group(1)), found.group(2), found.group(3)
        if language.lower() not in _PYTHON_NAMES:
            continue
        if directive != "code-block" or language != "python":
            raise AssertionError(
                f"{_relative(path)}:{index + 1}: write '.. code-block:: python', not '.. {directive}:: {language}'"
            )
        body = index + 1
        while body < len(lines) and lines[body].strip().startswith(":"):  # directive options
            body += 1
        code: list[str] = []
        start = None
        for line in lines[body:]:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            if start is None and line.strip():
                start = body + len(code)
            code.append(line)
        assert start is not None, f"{_relative(path)}:{index + 1}: empty code block"
        yield Block(_relative(path), start + 1, textwrap.dedent("\n".join(code)).strip("\n") + "\n")


def all_blocks() -> list[Block]:
    blocks: list[Block] = []
    for path in pages():
        blocks += markdown_blocks(path) if path.suffix == ".md" else rst_blocks(path)
    return blocks


def programs() -> list[Program]:
    """The runnable examples, grouped: a block marked CONTINUES joins the one before it."""
    found: list[Program] = []
    current: list[Block] = []
    for block in all_blocks():
        if block.fragment:
            continue
        if block.continues:
            if not current or current[-1].page != block.page:
                raise AssertionError(f"{block.label}: '{CONTINUES}' without a runnable example before it on the page")
            current.append(block)
            continue
        if current:
            found.append(Program(tuple(current)))
        current = [block]
    if current:
        found.append(Program(tuple(current)))
    return found


def fragments() -> list[Block]:
    return [block for block in all_blocks() if block.fragment]


# -- running ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    report: dict[str, list[Any]]

    def describe(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f}s\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def run_program(program: Program, workdir: Path) -> Outcome:
    """Run ``program`` in a fresh interpreter, from ``workdir``, as a user would."""
    script = workdir / "example.py"
    script.write_text(program.code, encoding="utf-8")
    runner = workdir / "_run_docs_example.py"
    runner.write_text(RUNNER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("CARROT_KOMBU_URL", "CELERY_BROKER_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(runner), str(script)], cwd=workdir, env=env,
            capture_output=True, text=True, timeout=HARD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Outcome(-9, time.monotonic() - started, out, err, {})
    seconds = time.monotonic() - started
    report: dict[str, list[str]] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("DOCS-EXAMPLE-REPORT "):
            report = json.loads(line[len("DOCS-EXAMPLE-REPORT "):])
    return Outcome(proc.returncode, seconds, proc.stdout, proc.stderr, report)


def check_outcome(program: Program, outcome: Outcome) -> None:
    """What every example must do, whatever it needs."""
    assert outcome.returncode == 0, f"{program.label} failed: {outcome.describe()}"
    assert outcome.report, f"{program.label}: the runner did not report: {outcome.describe()}"
    assert outcome.seconds <= EXAMPLE_SECONDS, f"{program.label} took {outcome.seconds:.1f}s: {outcome.describe()}"
    assert not outcome.report["unstopped"], (
        f"{program.label} left managers running (call stop()): {outcome.report['unstopped']}"
    )
    abandoned = [w for w in outcome.report["warnings"] if "garbage-collected" in w]
    assert not abandoned, f"{program.label} left objects to the garbage collector: {abandoned}"
    check_output_comments(program, outcome)


# -- "# output" comments -------------------------------------------------------------------

def output_comments(program: Program) -> dict[int, str]:
    """``print(...)  # comment`` statements on one line: {line in program.code: comment}.

    Such a comment says what the line prints (the documentation's convention):
    the output, in which ``...`` stands for text left out, optionally followed
    by an explanation after ``;`` or ``:`` or in brackets.
    """
    lines = program.code.splitlines()
    found = {}
    for node in ast.walk(ast.parse(program.code)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "print"
                and node.lineno == node.end_lineno and node.end_col_offset is not None):
            rest = lines[node.lineno - 1][node.end_col_offset:].strip()
            if rest.startswith("#"):
                found[node.lineno] = rest[1:].strip()
    return found


def comment_matches(comment: str, printed: str) -> bool:
    """Whether ``printed`` (one print's text, without its newline) is what ``comment`` says.

    The output is the whole comment or the part before an explanation, which
    starts with ``"; "``, ``": "`` or ``" ("``; ``...`` in it matches any text.
    """
    cuts = [len(comment), *(found.start() for found in re.finditer(r"[;:] | \(", comment))]
    for cut in cuts:
        claim = comment[:cut].rstrip()
        pattern = ".*?".join(re.escape(part) for part in claim.split("..."))
        if claim and re.fullmatch(pattern, printed, re.S):
            return True
    return False


def check_output_comments(program: Program, outcome: Outcome) -> None:
    """Every ``print(...)  # output`` line ran and printed what its comment says."""
    printed: dict[int, list[str]] = {}
    for line, text in outcome.report.get("printed", []):
        printed.setdefault(line, []).append(text.rstrip("\n"))
    for line, comment in output_comments(program).items():
        where = _block_label(program, line)
        assert line in printed, f"{where}: this print never ran, so its comment {comment!r} is unchecked"
        for text in printed[line]:
            assert comment_matches(comment, text), f"{where}: the comment says {comment!r}, the program printed {text!r}"


def _block_label(program: Program, line: int) -> str:
    """``page:line`` of line ``line`` (1-based) of ``program.code``."""
    for block in program.blocks:
        size = block.code.count("\n") + 1  # Program.code joins the blocks with one newline
        if line <= size:
            return f"{block.page}:{block.line + line - 1}"
        line -= size
    return f"{program.label}+{line}"


def literal_names(code: str) -> set[str]:
    """String literals that could name a queue or an exchange."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"[A-Za-z0-9_.:\-]{1,255}", node.value) and not node.value.startswith("amq."):
                names.add(node.value)
    return names


def broker_programs() -> list[Program]:
    return [p for p in programs() if p.needs_broker]


# -- the tests --------------------------------------------------------------------------------------

LOCAL = [p for p in programs() if not p.needs_broker]


def test_examples_are_found() -> None:
    blocks = all_blocks()
    assert {b.page for b in blocks} >= {"README.md", "docs/quickstart.rst", "docs/celery.rst", "docs/clusters.rst"}
    runnable = sum(len(p.blocks) for p in programs())
    assert runnable + len(fragments()) == len(blocks)
    assert LOCAL, "no example runs without RabbitMQ (memory://): the unit suite would test none"


def test_every_example_compiles() -> None:
    for block in all_blocks():
        compile(block.code, block.label, "exec")
    for program in programs():
        compile(program.code, program.label, "exec")


def test_configuration_fragments_are_the_listed_ones() -> None:
    found = []
    for block in fragments():
        lines = block.code.strip("\n").splitlines()
        assert len(lines) > 1, f"{block.label}: a fragment marker with nothing after it"
        found.append((block.page, lines[1]))
    print(f"\n{len(found)} of {len(all_blocks())} examples not run (configuration fragments):")
    for block, (_, line) in zip(fragments(), found):
        print(f"  {block.label}: {line}")
    assert sorted(found) == sorted(FRAGMENTS)


def test_markers_only_on_first_lines() -> None:
    for block in all_blocks():
        rest = block.code.strip("\n").splitlines()[1:]
        assert FRAGMENT not in rest and CONTINUES not in [line.strip() for line in rest], block.label


@pytest.mark.parametrize("program", LOCAL, ids=[p.label for p in LOCAL])
def test_example_runs_without_a_broker(program: Program, tmp_path: Path) -> None:
    check_outcome(program, run_program(program, tmp_path))



def test_api_page_documents_every_public_name() -> None:
    import carrot_kombu

    text = (ROOT / "docs" / "api.rst").read_text(encoding="utf-8")
    for name in carrot_kombu.__all__:
        documented = f"carrot_kombu.{name}" in text or re.search(rf"^\.\. py:data:: {re.escape(name)}$", text, re.M)
        assert documented, f"docs/api.rst does not document carrot_kombu.{name}"
    for module in ("carrot_kombu.transport", "carrot_kombu.celery", "carrot_kombu.exceptions"):
        assert f".. automodule:: {module}" in text


def test_extraction_refuses_python_blocks_it_would_not_run(tmp_path: Path) -> None:
    md = tmp_path / "page.md"
    md.write_text("text\n\n```python\nx = 1\n```\n\n```sh\nmake\n```\n")
    assert [(b.line, b.code) for b in markdown_blocks(md)] == [(4, "x = 1\n")]
    md.write_text("```py\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="write ```python"):
        list(markdown_blocks(md))
    rst = tmp_path / "page.rst"
    rst.write_text("Title\n\n.. code-block:: python\n   :caption: c\n\n   x = 1\n\n   y = 2\n\nafter\n")
    assert [(b.line, b.code) for b in rst_blocks(rst)] == [(6, "x = 1\n\ny = 2\n")]
    rst.write_text(".. code:: python\n\n   x = 1\n")
    with pytest.raises(AssertionError, match="code-block:: python"):
        list(rst_blocks(rst))


def test_output_comments_are_compared_with_what_the_line_printed() -> None:
    assert comment_matches("5", "5") and not comment_matches("5", "6")
    assert comment_matches("{'job': 1}; callbacks run on the consumer's thread", "{'job': 1}")
    assert comment_matches("[0.5, 1.0, 2.0]: then it gives up", "[0.5, 1.0, 2.0]")
    assert comment_matches("404 NOT_FOUND - no exchange 'x' in vhost '/'", "404 NOT_FOUND - no exchange 'x' in vhost '/'")
    assert comment_matches("bad field (use str, bytes, ...)", "bad field (use str, bytes, int)")
    assert comment_matches("Pool: 0 leased, ... limit 10]>", "Pool: 0 leased, 0 idle, limit 10]>")
    assert not comment_matches("Pool: 0 leased, 1 idle, limit 10]>", "Pool: 0 leased, 0 idle, limit 10]>")
    assert not comment_matches("{'job': 1}; a note", "{'job': 2}")
    program = Program((Block("page.rst", 10, "x = 2\nprint(x)  # 2\n"), Block("page.rst", 20, "print(x + 1)  # 4\n")))
    assert output_comments(program) == {2: "2", 4: "4"}
    with pytest.raises(AssertionError, match=r"page.rst:20: the comment says '4', the program printed '3'"):
        check_output_comments(program, Outcome(0, 0.1, "2\n3\n", "", {"printed": [[2, "2\n"], [4, "3\n"]]}))
    with pytest.raises(AssertionError, match=r"page.rst:11: this print never ran"):
        check_output_comments(program, Outcome(0, 0.1, "", "", {"printed": []}))
