"""The book: every notebook executes, the build keeps every figure, and the pages render offline.

Slow (runs every notebook with its smoke parameters, then jupyter-book); `make test-fast` skips it.
"""

from __future__ import annotations

import html.parser
import re
from pathlib import Path

import pytest

from conftest import REPO, load_page
from instab_core import book

pytestmark = pytest.mark.slow


def _book_names() -> list[str]:
    """Experiments in book order: notebooks in nbs/ plus toc pages whose notebook is missing."""
    names = list(book.experiments(REPO))
    for stem in book.toc_stems(REPO):
        key = stem.split("_")[0]
        if key not in names:
            names.append(key)
    return names


NAMES = _book_names()
TOC_NAMES = [s.split("_")[0] for s in book.toc_stems(REPO)]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_ran(built_book, name: str) -> None:
    run = built_book.runs[name]
    assert run.ok, f"{run.executed.name}: {run.error}"


def test_book_built(built_book) -> None:
    assert built_book.build_ok, "\n".join(built_book.problems)
    assert (built_book.html / "index.html").is_file()


@pytest.mark.parametrize("name", TOC_NAMES)
def test_figures_survive_build(built_book, name: str) -> None:
    """No silent plot loss: every plotly output has text/html and reaches the built page."""
    stem = built_book.runs[name].executed.name
    problems = [p for p in built_book.problems if p.startswith(stem)]
    assert not problems, "\n".join(problems)


class _AssetRefs(html.parser.HTMLParser):
    """Collects what a page loads (scripts, stylesheets, images, frames) and every http(s) URL named inside an inline
    script (a script could load it later: sphinx-thebe's CDN address was one) — not prose links <a href>."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self._in_script = False

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.refs += re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'<>]*", data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self._in_script = tag == "script"
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed"):
            self.refs.append(a.get("src") or "")
        elif tag == "link":
            self.refs.append(a.get("href") or "")
        elif tag == "object":
            self.refs.append(a.get("data") or "")


def test_no_external_assets(built_book) -> None:
    """No built page references a script, stylesheet or other asset by http(s):// (or //host), nor names such a URL
    in an inline script."""
    offenders = []
    pages = sorted(built_book.html.rglob("*.html"))
    assert pages
    for page in pages:
        parser = _AssetRefs()
        parser.feed(page.read_text(errors="replace"))
        for ref in parser.refs:
            if re.match(r"^(https?:)?//", ref.strip(), re.I):
                offenders.append(f"{page.relative_to(built_book.html)}: {ref}")
    for css in sorted(built_book.html.rglob("*.css")):
        for ref in re.findall(r"(?:@import\s+|url\()\s*['\"]?((?:https?:)?//[^'\")\s]+)", css.read_text(errors="replace")):
            offenders.append(f"{css.relative_to(built_book.html)}: {ref}")
    assert not offenders, "external assets:\n" + "\n".join(offenders)


def test_netlog_sees_external_requests(chromium, tmp_path: Path) -> None:
    """Control: the net-log check does flag a page that fetches from a CDN (else the offline test is vacuous)."""
    page = tmp_path / "cdn.html"
    cdn_host = ".".join(["cdn", "jsdelivr", "net"])  # built from parts: no CDN address is written in the repo
    page.write_text(f'<html><head><script src="https://{cdn_host}/npm/x@1/x.js"></script></head><body>x</body></html>')
    seen = load_page(chromium, page.as_uri())
    assert any(cdn_host in u for u in seen.external), seen


@pytest.mark.parametrize("page", ["book/intro.html", "book/method.html"])
def test_front_pages_offline(built_book, rendered, page: str) -> None:
    seen = rendered(built_book.html / page)
    assert not seen.external, f"{page} requested: {seen.external}"


@pytest.mark.parametrize("name", TOC_NAMES)
def test_experiment_page_renders_offline(built_book, rendered, name: str) -> None:
    """The page's plotly figures render from file:// with nothing fetched from the network."""
    page = built_book.page(name)
    assert page.is_file(), page
    seen = rendered(page)
    assert not seen.external, f"{page.name} requested: {seen.external}"
    if not built_book.runs[name].ok:
        pytest.skip(f"{name} did not run (see test_notebook_ran); its page was only checked for requests")
    figures = built_book.figures.get(name, 0)
    assert figures > 0, f"{page.name}: the notebook shows no plotly figure"
    svgs = len(re.findall(r'class="main-svg"', seen.dom))
    plots = len(re.findall(r'class="plotly-graph-div js-plotly-plot"', seen.dom))
    assert svgs > 0 and svgs >= figures, f"{page.name}: {svgs} main-svg for {figures} figures (plotly.js did not draw)"
    assert plots == figures, f"{page.name}: plotly drew {plots} of {figures} figures"


@pytest.mark.parametrize("name", TOC_NAMES)
def test_page_states_its_profile(built_book, name: str) -> None:
    """Each executed page says under its title which parameter profile it ran with (the book test: smoke), and,
    where make bench-scale finished it at real width, what its default and seed profiles cost there."""
    import json

    import nbformat
    run = built_book.runs[name]
    if not run.ok:
        pytest.skip(f"{name} did not run")
    nb = nbformat.read(run.executed, as_version=4)
    stamps = [c for c in nb.cells if "instab-profile" in c.metadata.get("tags", [])]
    assert len(stamps) == 1 and "`smoke` profile" in stamps[0].source, stamps
    assert nb.metadata["instab"]["run"]["profile"] == "smoke"
    scale = json.loads((REPO / "benchmarks" / "scale.json").read_text())["rows"].get(name, {})
    if scale.get("ok"):
        assert f"default run took {scale['wall_s']:.0f} s" in stamps[0].source, stamps[0].source
        assert scale["seed_cost"] in stamps[0].source and scale["model"] in stamps[0].source


@pytest.mark.parametrize("name", TOC_NAMES)
def test_page_ends_with_its_provenance(built_book, name: str) -> None:
    """The last cell of each executed page is its provenance, read from the manifests of the runs it finished."""
    import json

    import nbformat
    run = built_book.runs[name]
    if not run.ok:
        pytest.skip(f"{name} did not run")
    nb = nbformat.read(run.executed, as_version=4)
    last = nb.cells[-1]
    assert "instab-provenance" in last.metadata.get("tags", []), last.source[:200]
    assert "| profile | `smoke` |" in last.source and "git commit" in last.source
    for folder in run.results:
        m = json.loads((folder / "manifest.json").read_text())
        assert folder.name in last.source
        if m.get("model"):
            assert m["model"]["weights_hash"] in last.source and m["environment"]["torch"] in last.source


def test_status_page_lists_every_page_and_the_machine(built_book) -> None:
    page = built_book.html / "book" / "status.html"
    assert page.is_file()
    text = page.read_text()
    for r in [*built_book.runs.values(), *built_book.campaigns.values()]:
        assert r.executed.stem in text, r.executed.stem
    assert book.machine()["cpu"] in text


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif value is not None:
        yield value


def test_findings_page_is_second_and_its_numbers_are_the_manifests(built_book) -> None:
    """The findings page follows the introduction; on every row, each manifest key it names (after *from*) has its
    value, as the page formats numbers, in that row's measured or verdict text; every experiment of the build has
    a row with a run."""
    import json

    from bs4 import BeautifulSoup

    from instab_core import findings
    intro = (built_book.html / "book" / "intro.html").read_text()
    assert re.search(r'class="right-next"\s+href="findings.html"', intro), "the findings page is not the second page"
    soup = BeautifulSoup((built_book.html / "book" / "findings.html").read_text(), "html.parser")
    rows = soup.select("table tbody tr")
    assert len(rows) == len(findings.CLAIMS)
    ran = {json.loads((p / "manifest.json").read_text())["experiment"]
           for r in built_book.runs.values() if r.ok for p in r.results}
    checked = 0
    for tr in rows:
        td = tr.find_all("td")  # experiment and verdict | measured, why and (small) where from | the seed's quote
        small = td[1].find("small")  # "from <experiment>/<run id>: key; key; ..." (keys may hold commas), taken out of the text checked
        codes = re.split(r":\s|;\s", small.extract().get_text(" ", strip=True).removeprefix("from ")) if small else []
        exp, verdict, shown = td[0].find("a") or td[0], td[0].find("strong").get_text(), td[1].get_text(" ", strip=True)
        exp = exp.get_text(strip=True).split()[0]
        if exp in ran:
            assert codes and verdict != "not run", f"{exp} ran, but its row says: {verdict}: {shown}"
        if not codes:
            continue
        folder = next(p for r in built_book.runs.values() for p in r.results if p.as_posix().endswith("/" + codes[0]))
        summary = json.loads((folder / "manifest.json").read_text())["summary"]
        for key in codes[1:]:
            node = summary
            for part in key.split("."):
                node = node[part]
            for leaf in _leaves(node):
                assert findings.fmt(leaf) in shown, f"{exp}: {key} = {leaf!r} is not on its row: {shown}"
                checked += 1
    assert checked >= 2 * len(ran), f"only {checked} figures checked"
