"""Shared fixtures: the repository root, the built book, and a headless Chromium to look at it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

import instab_core as ic
from randmodels import random_model_dir

REPO = Path(__file__).resolve().parents[1]

# toolchain.md section 4: flags that keep headless Chromium quiet and self-contained.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def handle(request, tmp_path_factory):
    """A fresh random model of each family (session seed), loaded by the one loader. Test modules that need
    another shape (more layers, float64) define their own ``handle``."""
    return ic.load_model(random_model_dir(tmp_path_factory.mktemp(request.param), request.param))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# The user's work: a checkout may hold a full book or hours of GPU runs here. Tests never write into them.
USER_AREAS = ("book/experiments", "book/campaigns", "_build", "results", "campaigns")


def scratch_checkout(dest: Path, src: Path = REPO) -> Path:
    """Copy the checkout's files (tracked, plus untracked ones git does not ignore, plus the vendored JavaScript)
    to ``dest``, without the user's book/experiments/, _build/ and results/, and return ``dest``.

    Builds and notebook runs in tests use such a copy, so ``make test`` never replaces the user's book.
    """
    if (src / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                                capture_output=True, text=True, check=True).stdout.split("\0")
    else:  # a copy made by this function
        skip = (".venv", ".git", "__pycache__")
        listed = [str(p.relative_to(src)) for p in src.rglob("*")
                  if p.is_file() and not set(p.relative_to(src).parts) & set(skip)]
    files = [f for f in listed if f and not f.startswith(tuple(a + "/" for a in USER_AREAS))]
    for vendored in (src / "book" / "_static" / "mathjax", src / "book" / "_extra"):  # npm packs, gitignored
        files += [str(p.relative_to(src)) for p in vendored.rglob("*") if p.is_file()] if vendored.is_dir() else []
    for f in files:
        if (src / f).is_file():  # a file deleted but not yet committed is still listed
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dest / f)
    (dest / "book" / "experiments").mkdir(parents=True, exist_ok=True)
    return dest


def snapshot(root: Path, areas: tuple[str, ...] = USER_AREAS) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file under ``areas`` of ``root``: what a test must leave as it found it."""
    out: dict[str, tuple[int, int]] = {}
    for area in areas:
        for p in sorted((root / area).rglob("*")) if (root / area).is_dir() else []:
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session", autouse=True)
def users_work_untouched():
    """The whole test session leaves the checkout's book/experiments/, _build/ and results/ as they were."""
    before = snapshot(REPO)
    yield
    after = snapshot(REPO)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests changed the user's files in {REPO}: {changed[:10]}"


@pytest.fixture(scope="session")
def built_book(tmp_path_factory: pytest.TempPathFactory):
    """Execute every notebook with its smoke parameters and build the book, in a scratch copy of the
    checkout (never in the user's book/experiments/ or _build/); results go to a temporary INSTAB_RESULTS."""
    from instab_core import book

    root = scratch_checkout(tmp_path_factory.mktemp("checkout"))
    results = tmp_path_factory.mktemp("results")
    report = book.build_book_report(root, run=True, profile="smoke", results_root=results)
    book.print_summary(report)  # shown with pytest -s or on failure
    return report


def _find_chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def rendered(built_book, chromium):
    """Each page loaded once over file:// in headless Chromium (cached across tests). The book's pages are all
    loaded up front, two Chromiums at a time (a page costs seconds of plotly and MathJax, mostly single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    html = built_book.html / "book"
    pages = [*sorted(html.glob("*.html")), *sorted((html / "experiments").glob("*.html")),
             *sorted((html / "campaigns").glob("*.html"))]
    cache = {p.resolve(): pool.submit(load_page, chromium, p.resolve().as_uri()) for p in pages}

    def get(page: Path):
        page = page.resolve()
        if page not in cache:
            cache[page] = pool.submit(load_page, chromium, page.as_uri())
        return cache[page].result()

    yield get
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path to Chromium; skipped locally if missing, a failure under CI (which installs it)."""
    path = _find_chromium()
    if path is None:
        msg = "chromium not installed: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must install it: .ci/run does)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args, chromium):
    """pytest-playwright drives Debian's Chromium (no browser download): headless, with the flags above."""
    return {**browser_type_launch_args, "executable_path": chromium, "args": CHROMIUM_FLAGS[1:]}


class OfflinePage:
    """A playwright page whose requests to any host but this machine are aborted (and recorded in ``blocked``)."""

    def __init__(self, context) -> None:
        self.blocked: list[str] = []
        context.route("**/*", self._route)
        self.page = context.new_page()

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")) or urlparse(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()


@pytest.fixture
def offline_page(context) -> OfflinePage:
    """A fresh playwright page (pytest-playwright's ``context``) that cannot reach off-machine URLs."""
    return OfflinePage(context)


@dataclass
class Rendered:
    """What headless Chromium saw: the DOM after scripts ran, and the page's own network requests."""

    dom: str
    external: list[str]  # page requests to anything but file:// and localhost
    page_requests: list[str]  # every http(s)/ws request the page made (initiator = the page)
    background: list[str]  # Chromium's own requests (update checks, accounts): not the page's


def load_page(chromium: str, url: str, window: str = "1280,2200", screenshot: Path | None = None) -> Rendered:
    """Load ``url`` in a fresh headless Chromium profile; return the DOM and the network requests."""
    with tempfile.TemporaryDirectory(prefix="instab-chromium-") as tmp:
        netlog = Path(tmp) / "netlog.json"
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={Path(tmp) / 'profile'}",
            f"--window-size={window}",
            "--virtual-time-budget=15000",  # let the page's scripts (plotly, MathJax) run before the capture
            f"--log-net-log={netlog}",
        ]
        cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        r = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")
        page, background = _requests(netlog)
    external = [u for u in page if urlparse(u).hostname not in LOCAL_HOSTS]
    return Rendered(dom=r.stdout, external=external, page_requests=page, background=background)


def _requests(netlog: Path) -> tuple[list[str], list[str]]:
    """Split the net-log's URL requests into the page's and Chromium's own.

    Measured on Chromium 156: requests a page makes carry its origin as initiator ("null" for a
    file:// page); Chromium's background requests (accounts.google.com, update.googleapis.com,
    clients2.google.com, despite the flags) carry "not an origin". file:// loads are not in the log.
    """
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # Chromium killed before it closed the JSON
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    page: list[str] = []
    background: list[str] = []
    for ev in log["events"]:
        params = ev.get("params") or {}
        if names.get(ev["type"]) != "URL_REQUEST_START_JOB" or "url" not in params:
            continue
        (background if params.get("initiator") == "not an origin" else page).append(params["url"])
    return page, background


def pytest_report_header(config):
    from randmodels import SESSION_SEED
    return f"instab random-input seed: {SESSION_SEED} (replay with INSTAB_TEST_SEED={SESSION_SEED})"
