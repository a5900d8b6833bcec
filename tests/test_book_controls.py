"""Explorable offline pages: plotly sliders and menus in the built book switch the visible traces, from file://,
with no request leaving the machine."""

from __future__ import annotations

import nbformat
import pytest

from instab_core import book

pytestmark = pytest.mark.slow

# (page, control) clicked in Chromium; the page count below covers every page.
CLICKED = [("exp01", "slider"), ("exp04", "slider"), ("exp07", "menu")]
VISIBLE = "(gd) => JSON.stringify(gd._fullData.map(t => t.visible))"


def _controls(executed) -> int:
    """Figures in an executed notebook whose layout carries a slider or a dropdown menu."""
    nb = nbformat.read(executed, 4)
    return sum(1 for c in nb.cells for o in c.get("outputs", [])
               for fig in [o.get("data", {}).get(book.PLOTLY_MIME)] if fig
               and (fig.get("layout", {}).get("sliders") or fig.get("layout", {}).get("updatemenus")))


def test_at_least_six_pages_are_explorable_offline(built_book):
    explorable = {name: n for name, run in built_book.runs.items() if run.ok and (n := _controls(run.executed))}
    assert len(explorable) >= 6, explorable


@pytest.mark.parametrize("name,control", CLICKED)
def test_a_control_switches_the_visible_traces(built_book, offline_page, name, control):
    if not built_book.runs[name].ok:
        pytest.skip(f"{name} did not run (see test_book.py::test_notebook_ran)")
    page = offline_page.page
    page.goto(built_book.page(name).as_uri())
    selector = ".slider-container" if control == "slider" else ".updatemenu-container"
    div = page.locator(".plotly-graph-div", has=page.locator(selector)).first
    div.wait_for(timeout=30_000)
    div.scroll_into_view_if_needed()
    before = div.evaluate(VISIBLE)
    if control == "slider":  # click the end of the rail away from the step the page opens on
        box = div.locator(".slider-rail-touch-rect").bounding_box()
        at_start = div.evaluate("gd => (gd.layout.sliders[0].active || 0) === 0")
        page.mouse.click(box["x"] + (box["width"] - 3 if at_start else 3), box["y"] + box["height"] / 2)
    else:  # open the menu, pick its last entry; menus open on the first
        div.locator(".updatemenu-header").first.click()
        div.locator(".updatemenu-dropdown-button").last.click()
    page.wait_for_function(f"gd => ({VISIBLE})(gd) !== {before!r}", arg=div.element_handle(), timeout=10_000)
    after = div.evaluate(VISIBLE)
    assert after != before and "true" in after
    assert offline_page.blocked == []
