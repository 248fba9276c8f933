"""Every link and repository file name in the docs, configs, scripts and code comments
resolves, and every recipe command the docs show passes ``letrecipes validate``."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = sorted(REPO.glob("docs/*.md")) + [REPO / "README.md"]
TEXTS = MARKDOWN + sorted([*REPO.glob("recipes/configs/*.yaml"), *REPO.glob("components/*.py"),
                           *REPO.glob("letrecipes/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("benchmarks/*.sh"),
                           *REPO.glob("scripts/*"), *REPO.glob("tests/*.py")])
# a repository path in prose or a comment; benchmarks/results/ (and a benchmark's own docs/img/ plot)
# is what benchmarks write
FILE_NAME = re.compile(r"(?<![\w/.-])((?:docs|components|letrecipes|benchmarks|recipes|scripts|tests)/[\w./-]*\w"
                       r"\.(?:md|py|yaml|sh|png))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    return {heading_anchor(h) for h in re.findall(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), flags=re.M)}


def test_every_markdown_link_reaches_a_file_and_heading():
    broken = []
    for page in MARKDOWN:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_file_name_mentioned_exists():
    missing = []
    for text_file in TEXTS:
        for name in FILE_NAME.findall(text_file.read_text(encoding="utf-8", errors="replace")):
            written_by_a_benchmark = name.startswith("benchmarks/results/") or (
                text_file.parent.name == "benchmarks" and name.startswith("docs/img/"))
            if written_by_a_benchmark or (REPO / name).exists():
                continue
            missing.append(f"{text_file.relative_to(REPO)}: {name}")
    assert not missing, "\n".join(missing)


def test_docs_cite_only_notes_that_are_in_the_repository():
    outside = [f"{p.relative_to(REPO)}: {m}" for p in TEXTS
               for m in re.findall(r"\b(?:let-method|install|architecture|sources)\.md\b|\bissue \d+\b|\.\./shared",
                                   p.read_text(encoding="utf-8", errors="replace"))
               if p.suffix in (".md", ".yaml")]
    assert not outside, "\n".join(outside)


# `tune run [launcher flags] letrecipes/<recipe> --config ...`, `python -m letrecipes.<recipe> --config ...`,
# and the CLI's commands that read a config with overrides: `letrecipes cat`, `letrecipes prepare-data`
RECIPE_COMMAND = re.compile(r"(?:tune run (?:--\S+ (?:\S+ )?)*letrecipes/|python -m letrecipes\.)"
                            r"(?:let_pretrain|pretrain|eval) --config (.+)"
                            r"|letrecipes (?:cat|prepare-data --config) (.+)")
CLI_OPTION = re.compile(r"--(?:out|workers) \S+")


def recipe_commands():
    """(page, config and overrides) of each recipe command in the docs and the configs'
    comments: in code blocks, a trailing backslash joins the next line; in prose, each
    `code span` is read alone. A command with a placeholder (`...`, `<final, ...>`) is no
    command to check."""
    for page in MARKDOWN + sorted(REPO.glob("recipes/configs/*.yaml")):
        text = re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))
        shorthand = dict(re.findall(r"^(\w+)=\"([^\"]*)\"$", text, flags=re.M))  # extending.md's D="..."
        for line in text.splitlines():
            for piece in re.findall(r"`([^`]+)`", line) if "`" in line else [line]:
                found = RECIPE_COMMAND.search(piece)
                command = found and CLI_OPTION.sub("", found.group(1) or found.group(2)).split(" #")[0]
                if command and not re.search(r"\.\.\.|<|NAME", command):
                    words = re.sub(r"\$(\w+)", lambda m: shorthand.get(m.group(1), m.group(0)), command)
                    yield page.name, shlex.split(words)


def test_the_docs_show_recipe_commands_to_check():
    commands = list(recipe_commands())
    assert len(commands) >= 30 and {page for page, _ in commands} >= {"README.md", "guide.md", "scale.md"}


@pytest.mark.parametrize("page, words", list(recipe_commands()), ids=lambda v: v if isinstance(v, str) else None)
def test_every_recipe_command_in_the_docs_passes_validate(page, words, monkeypatch, capsys):
    """A key renamed in the code and left in a page, or a config that is gone, fails here."""
    from letrecipes import cli
    from letrecipes.components import registry

    monkeypatch.setattr(sys, "path", [str(REPO / "docs" / "examples"), *sys.path])  # the extending examples
    imported = set(sys.modules)
    try:
        code = cli.main(["validate", *words])
    except SystemExit as stopped:  # the one-line error of a bad key
        pytest.fail(f"{page}: {' '.join(words)}: {stopped}")
    finally:  # an example's `imports:` registers its component: other tests expect the package's own only
        examples = {name for name in set(sys.modules) - imported
                    if str(getattr(sys.modules[name], "__file__", "")).startswith(str(REPO / "docs"))}
        for names in registry._REGISTRY.values():
            for name in [n for n, built in names.items() if getattr(built, "__module__", None) in examples]:
                del names[name]
        for name in examples:
            del sys.modules[name]
    assert code == 0, f"{page}: {' '.join(words)}\n{capsys.readouterr().err}"
