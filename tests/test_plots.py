"""Offline controls: a slider or menu step shows exactly its own figure's traces and title."""

from __future__ import annotations

import pytest

from instab_core import plots as P


def _figs(n: int) -> dict[str, object]:
    return {f"k{i}": P.line([0, 1], {"a": [i, i], "b": [i, -i]}, title=f"frame {i}", ylabel=f"y{i}") for i in range(n)}


@pytest.mark.parametrize("control", [P.slider, P.menu])
def test_each_step_shows_its_own_traces_and_title(control):
    fig = control(_figs(3), "stage", active=1)
    steps = (fig.layout.sliders[0].steps if control is P.slider else fig.layout.updatemenus[0].buttons)
    assert len(fig.data) == 6 and len(steps) == 3
    for k, step in enumerate(steps):
        visible, layout = step.args
        assert visible["visible"] == [k * 2 <= i < k * 2 + 2 for i in range(6)]
        assert layout["title.text"] == f"frame {k}" and layout["yaxis.title.text"] == f"y{k}"
        assert [tr.y[0] for tr, v in zip(fig.data, visible["visible"]) if v] == [k, k]
    assert [tr.visible for tr in fig.data] == steps[1].args[0]["visible"]  # opens on the active step
    assert fig.layout.title.text == "frame 1" and fig.layout.yaxis.title.text == "y1"


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="no figures"):
        P.slider({}, "stage")
    with pytest.raises(ValueError, match="active=3"):
        P.slider(_figs(2), "stage", active=3)
    with pytest.raises(ValueError, match="names traces \\[5\\]"):
        P.dropdown(P.line([0], {"a": [1]}), {"g": [5]})


def test_dropdown_without_all_opens_on_the_first_group():
    fig = P.dropdown(P.line([0, 1], {"a": [1, 2], "b": [3, 4], "c": [5, 6]}), {"ab": [0, 1], "c": [2]}, all_label=None)
    assert [tr.visible for tr in fig.data] == [True, True, False]
    assert [b.args[0]["visible"] for b in fig.layout.updatemenus[0].buttons] == [[True, True, False], [False, False, True]]
