"""The README holds as printed: its Python snippets run, its ``m2rec`` command lines parse, and every
"DESIGN §N" the repository cites exists in docs/DESIGN.md."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from m2rec.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DESIGN = REPO / "docs" / "DESIGN.md"


def python_snippets():
    """Every ```python block, except one right after an HTML comment that says why it is not run here
    (e.g. a whole training run; such a comment names the test that covers the same calls)."""
    blocks = re.findall(r"(<!-- not run by tests[^>]*-->\n)?```python\n(.*?)```", README, flags=re.S)
    return [code for skipped, code in blocks if not skipped]


def command_lines():
    """``m2rec ...`` lines of the README's indented command blocks, without their comments."""
    lines = [line.strip() for line in README.splitlines() if line.startswith("    m2rec ")]
    return [shlex.split(line, comments=True) for line in lines]


def test_the_readme_has_snippets_and_commands():
    assert python_snippets() and len(command_lines()) >= 5


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_python_snippet_runs_as_printed(index):
    namespace = {"__name__": "__readme__"}
    exec(compile(python_snippets()[index], f"README.md python snippet {index}", "exec"), namespace)
    model = namespace.get("model")
    if model is not None and all(name in namespace for name in ("scores", "items", "lengths")):
        # scores are documented as deterministic: the model must be in eval mode when it scores
        # (the serving snippet's scores come from step(), after a prefill of its own histories)
        assert not model.training
        with torch.no_grad():
            again = model.scores(namespace["items"], namespace["lengths"])
        assert torch.equal(again, namespace["scores"])
        assert namespace["scores"].shape == (2, model.n_items + 1)


@pytest.mark.parametrize("argv", command_lines(), ids=lambda argv: " ".join(argv[:2]))
def test_command_line_parses(argv):
    assert argv[0] == "m2rec"
    args = build_parser().parse_args(argv[1:])
    assert callable(args.func)


def _design_sections():
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", DESIGN.read_text(encoding="utf-8"), flags=re.M)
    return set(headings)


def _cited_sections():
    cited = {}
    for path in [REPO / "README.md", REPO / "tasks.py"] + sorted(
            p for folder in ("m2rec", "m2rec_kernels", "bench", "tests", "docs")
            for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md")):
        text = path.read_text(encoding="utf-8")
        for group in re.findall(r"DESIGN[^§\n]{0,4}(§[\d.]+(?:(?:,| and) §[\d.]+)*)", text):
            for number in re.findall(r"§(\d+(?:\.\d+)*)", group):
                cited.setdefault(number, str(path.relative_to(REPO)))
    return cited


def test_design_document_has_every_section_the_repository_cites():
    assert DESIGN.is_file()
    sections = _design_sections()
    cited = _cited_sections()
    assert "2.1" in cited and "7" in cited  # the scan's module and the data protocol cite it
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert not missing, f"cited but not in docs/DESIGN.md: {missing}"


def test_readme_points_to_the_repository_design_document():
    assert "docs/DESIGN.md" in README
    assert "shared folder" not in README
