"""The documentation site builds with no warning, and its link check bites.

``mkdocs.yml`` turns broken links, unknown anchors, absolute links and pages
left out of the nav into warnings, and ``strict: true`` makes any warning
fail the build: what ``python3 dev.py docs`` runs, here on the real docs and
on copies of them with one defect each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mkdocs.yml"
DOCS = ROOT / "docs"


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of *config* into *site*, as dev.py runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
        + ["--site-dir", str(site)],
        capture_output=True,
        text=True,
        # Material's end-of-life banner is printed on every build; it is not
        # a warning about the docs.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real docs, built."""
    out = tmp_path_factory.mktemp("site")
    result = build(CONFIG, out)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    return out


def anchors(page: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page.read_text()))


def test_site_builds_strict_with_every_page_and_the_chart(site: Path) -> None:
    """Every Markdown file of docs/ is a page of the site (the nav lists them
    all, or the build fails), and the performance chart is where the page
    looks for it."""
    pages = sorted(p.stem for p in DOCS.glob("*.md"))
    assert {"index", "configuration", "deployment", "troubleshooting"} <= set(pages)
    for stem in pages:
        html = site / ("index.html" if stem == "index" else f"{stem}/index.html")
        assert html.is_file(), stem
    performance = (site / "performance" / "index.html").read_text()
    assert 'src="../bench.png"' in performance
    assert (site / "bench.png").read_bytes() == (DOCS / "bench.png").read_bytes()
    assert not (site / "gen_options.py").exists()  # a tool, not a page


def test_configuration_page_renders_the_generated_option_table(site: Path) -> None:
    """The table docs/gen_options.py writes between its markers is an HTML
    table on the page, a row per option (tests/test_docs.py keeps the
    Markdown equal to the options module)."""
    markdown = (DOCS / "configuration.md").read_text()
    table = markdown.split("<!-- options:start -->")[1].split("<!-- options:end -->")[0]
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert len(names) >= 20, table
    html = (site / "configuration" / "index.html").read_text()
    for name in names:
        assert f"<td><code>{name}</code></td>" in html, name


def test_readme_links_into_docs_reach_existing_pages_and_headings(site: Path) -> None:
    """The README is not part of the site, but its links into docs/ must land."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(docs/([\w-]+)\.md(?:#([\w-]+))?\)", readme)
    assert links
    for stem, anchor in links:
        html = site / ("index.html" if stem == "index" else f"{stem}/index.html")
        assert html.is_file(), stem
        if anchor:
            assert anchor in anchors(html), f"docs/{stem}.md#{anchor}"


#: One defect each: what is done to a copy of the docs, and what the failed
#: build must say.
DEFECTS = {
    "link to a missing page": (
        "index.md",
        "\n[gone](no-such-page.md)\n",
        "contains a link 'no-such-page.md', but the target is not found",
    ),
    "link to a missing heading of another page": (
        "index.md",
        "\n[gone](failures.md#no-such-heading)\n",
        "does not contain an anchor '#no-such-heading'",
    ),
    "link to a missing heading of the same page": (
        "troubleshooting.md",
        "\n[gone](#no-such-heading)\n",
        "contains a link '#no-such-heading', but there is no such anchor on this page",
    ),
    "absolute link": (
        "deployment.md",
        "\n[gone](/configuration.md)\n",
        "contains an absolute link '/configuration.md'",
    ),
    "image that is not there": (
        "performance.md",
        "\n![gone](no-such-chart.png)\n",
        "contains a link 'no-such-chart.png', but the target is not found",
    ),
    "page left out of the nav": (
        "orphan.md",
        "# Orphan\n",
        'not included in the "nav" configuration:\n  - orphan.md',
    ),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_strict_build_fails_naming_the_defect(defect: str, tmp_path: Path) -> None:
    page, text, said = DEFECTS[defect]
    shutil.copy(CONFIG, tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with (tmp_path / "docs" / page).open("a") as f:
        f.write(text)
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert said in output, output
    assert "Aborted with 1 warnings in strict mode!" in output, output


def test_strict_build_fails_on_a_nav_entry_without_its_page(tmp_path: Path) -> None:
    shutil.copy(CONFIG, tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    (tmp_path / "docs" / "troubleshooting.md").unlink()
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "A reference to 'troubleshooting.md' is included in the 'nav'" in output, output
