"""The README and docs/ stay true to the command line and to each other.

A newcomer reads README.md's option table as the list of what ``onnxopt`` takes: every long option
that the parser defines must be named there (``onnxopt bench``'s on its page, docs/latency.md). And
a link that leads nowhere is a dead end: every relative link in README.md and docs/*.md must name
an existing file and, where it has a ``#fragment``, a heading of that file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnxopt import bench, cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _long_options(parser) -> list[str]:
    return sorted({s for action in parser._actions for s in action.option_strings
                   if s.startswith("--") and s != "--help"})


def _named(option: str, text: str) -> bool:
    """``--prune`` is named by ``--prune`` or ``--prune RATIO``, not by ``--prune-first``."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _missing_options(parser, text: str) -> list[str]:
    return [o for o in _long_options(parser) if not _named(o, text)]


def _outside_code(text: str) -> str:
    """The text with fenced code blocks and inline code removed: links and headings live outside them."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    return broken


def test_readme_names_every_option_of_the_command_line():
    readme = (ROOT / "README.md").read_text()
    assert len(_long_options(cli.build_parser())) > 30  # the parser was found, not an empty one
    assert _missing_options(cli.build_parser(), readme) == []


def test_latency_page_names_every_option_of_bench():
    assert _missing_options(bench.build_parser(), (ROOT / "docs" / "latency.md").read_text()) == []


def test_a_removed_option_is_caught():
    readme = (ROOT / "README.md").read_text()
    without = readme.replace("`--prune-first`", "`--first`")
    assert _missing_options(cli.build_parser(), without) == ["--prune-first"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_somewhere(page):
    assert _broken_links(page) == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading) [gone](missing.md) [bad](there.md#nothing)\n"
                    "`[code](ignored.md)`\n")
    assert _broken_links(page) == ["missing.md: no such file", "there.md#nothing: no heading #nothing in there.md"]


def test_fresh_machine_command_names_files_that_exist():
    """The README's first command optimizes the bundled digits model: its files must be there."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "python -m onnxopt models/digits/" in line)
    for path in re.findall(r"models/\S+\.(?:onnx|npz)", command):
        assert (ROOT / path).is_file(), path
