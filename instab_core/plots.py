"""The project's one figure style: an offline book renderer, the "instab" template, small figure helpers.

Every notebook calls :func:`use_book_renderer` in its first cell. Every helper returns a
``plotly.graph_objects.Figure``; call ``fig.show()`` (or leave it as the cell's last expression).
Non-finite values (inf, nan) are drawn as gaps: plotly.js cannot place inf on an axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer

__all__ = [
    "PALETTE",
    "BookHtmlRenderer",
    "use_book_renderer",
    "line",
    "scatter",
    "heatmap",
    "polar",
    "radar",
    "histogram",
    "dropdown",
    "slider",
    "menu",
]

# Okabe-Ito, reordered so the first colours are the most distinct on white (colour-blind safe).
PALETTE: list[str] = [
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow (last: weak contrast on white)
]
SEQUENTIAL = "Viridis"  # perceptually uniform, colour-blind safe
DIVERGING = "RdBu_r"  # used when a heatmap has a meaningful midpoint (zmid)
FONT = "Helvetica, Arial, 'DejaVu Sans', sans-serif"  # system fonts only: the book is offline

ArrayLike = Any  # numpy array, list, or a torch tensor


def _template() -> go.layout.Template:
    """plotly_white with the project's palette, fonts and spacing."""
    t = go.layout.Template(pio.templates["plotly_white"])
    t.layout.update(
        colorway=PALETTE,
        font=dict(family=FONT, size=13, color="#222222"),
        title=dict(font=dict(size=16), x=0.0, xanchor="left"),
        margin=dict(l=70, r=30, t=60, b=60),
        hovermode="closest",
        hoverlabel=dict(font=dict(family=FONT)),
        legend=dict(bgcolor="rgba(255,255,255,0.7)"),
        colorscale=dict(sequential=SEQUENTIAL, diverging=DIVERGING),
        xaxis=dict(showline=True, linecolor="#444444", ticks="outside", exponentformat="power"),
        yaxis=dict(showline=True, linecolor="#444444", ticks="outside", exponentformat="power"),
        polar=dict(radialaxis=dict(exponentformat="power")),
    )
    return t


pio.templates["instab"] = _template()


# A figure is sized when its script runs, before the rest of the page (and its scrollbar) exists,
# so early figures come out a few pixels too wide; resize every figure once the page has loaded.
_RESIZE_ON_LOAD = (
    "window.addEventListener('load', function () {"
    " var gd = document.getElementById('{plot_id}'); if (gd && window.Plotly) { Plotly.Plots.resize(gd); } });"
)


class BookHtmlRenderer(MimetypeRenderer):
    """Emit text/html without plotly.js and without MathJax.

    myst-nb drops the plotly mimetype, so the book needs text/html; the book ships plotly.min.js
    once in ``_static`` instead of 4.6 MB inside every figure (toolchain.md section 4, Option B).
    """

    def __init__(self, config: dict | None = None) -> None:
        self.config = {"responsive": True, **(config or {})}

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        html = pio.to_html(
            fig_dict,
            config=self.config,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height=525,
            validate=False,
            post_script=_RESIZE_ON_LOAD,
        )
        return {"text/html": html}


def use_book_renderer() -> None:
    """Make every figure render in JupyterLab (plotly mimetype) and in the offline book (text/html).

    Call it in the first cell of every notebook. Also makes "instab" the default template.
    """
    pio.renderers["book"] = BookHtmlRenderer()
    pio.renderers.default = "plotly_mimetype+book"
    pio.templates.default = "instab"


def _arr(a: ArrayLike) -> np.ndarray:
    """A float numpy array from a list, numpy array or torch tensor; non-finite -> nan (a gap)."""
    if hasattr(a, "detach"):  # torch tensor; bfloat16 has no numpy dtype
        a = a.detach().cpu()
        if not a.dtype.is_floating_point or a.dtype.itemsize < 4:
            a = a.double()
        a = a.numpy()
    out = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(out), out, np.nan)


def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str, log_x: bool, log_y: bool) -> go.Figure:
    fig.update_layout(template="instab", title=title or None)
    # "-" lets plotly detect the type, so string labels (stage names, tokens) make a category axis.
    fig.update_xaxes(title=xlabel or None, type="log" if log_x else "-")
    fig.update_yaxes(title=ylabel or None, type="log" if log_y else "-")
    return fig


def line(
    x: ArrayLike,
    ys: Mapping[str, ArrayLike],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_x: bool = False,
    log_y: bool = False,
    markers: bool = False,
) -> go.Figure:
    """One line per entry of ``ys`` (legend name -> values), all over the same ``x``."""
    xs = _arr(x)
    fig = go.Figure()
    for name, y in ys.items():
        fig.add_trace(go.Scatter(x=xs, y=_arr(y), name=str(name), mode="lines+markers" if markers else "lines"))
    return _layout(fig, title, xlabel, ylabel, log_x, log_y)


def scatter(
    x: ArrayLike,
    y: ArrayLike,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    color: ArrayLike | None = None,
    color_label: str = "",
    text: Sequence[str] | None = None,
    name: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
) -> go.Figure:
    """Points (x, y); optional continuous ``color`` with a colour bar and per-point hover ``text``."""
    marker: dict[str, Any] = dict(size=7, opacity=0.85)
    if color is not None:
        marker.update(color=_arr(color), colorscale=SEQUENTIAL, showscale=True, colorbar=dict(title=color_label or None))
    fig = go.Figure(
        go.Scatter(x=_arr(x), y=_arr(y), mode="markers", marker=marker, text=text, name=name, showlegend=name is not None)
    )
    return _layout(fig, title, xlabel, ylabel, log_x, log_y)


def heatmap(
    z: ArrayLike,
    x: ArrayLike | None = None,
    y: ArrayLike | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    colorscale: str | None = None,
    zmid: float | None = None,
    zlabel: str = "value",
    text: ArrayLike | None = None,
) -> go.Figure:
    """A heatmap of ``z`` (rows = y, columns = x).

    ``colorscale`` defaults to Viridis, or to a diverging scale centred on ``zmid`` when given.
    Hover shows ``xlabel``, ``ylabel`` and ``zlabel`` values, plus ``text`` (same shape as z) if given.
    x and y may be numbers or category labels (strings).
    """
    zz = _arr(z)
    if colorscale is None:
        colorscale = DIVERGING if zmid is not None else SEQUENTIAL
    xl, yl = xlabel or "x", ylabel or "y"
    hover = f"{xl}: %{{x}}<br>{yl}: %{{y}}<br>{zlabel}: %{{z:.4g}}"
    if text is not None:
        hover += "<br>%{text}"
    fig = go.Figure(
        go.Heatmap(
            z=zz,
            x=None if x is None else _labels(x),
            y=None if y is None else _labels(y),
            colorscale=colorscale,
            zmid=zmid,
            text=None if text is None else np.asarray(text, dtype=object),
            hovertemplate=hover + "<extra></extra>",
            colorbar=dict(title=zlabel),
        )
    )
    return _layout(fig, title, xlabel, ylabel, False, False)


def _labels(a: ArrayLike) -> np.ndarray | list:
    """Axis values: numbers as floats, anything else (token strings) kept as categories."""
    if isinstance(a, (list, tuple)) and a and isinstance(a[0], str):
        return list(a)
    return _arr(a)


def polar(
    theta_rad: ArrayLike,
    rs: Mapping[str, ArrayLike],
    title: str = "",
    log_r: bool = False,
    r_label: str = "r",
    close: bool = False,
) -> go.Figure:
    """One polar curve per entry of ``rs`` over angles ``theta_rad`` (radians; drawn in degrees).

    ``log_r`` puts the radial axis on a log scale (boundary scales span decades);
    ``close`` joins the last point to the first (a full circle of rays).
    """
    deg = np.degrees(_arr(theta_rad))
    fig = go.Figure()
    for name, r in rs.items():
        rr = _arr(r)
        th = deg
        if close and len(rr):
            rr, th = np.append(rr, rr[0]), np.append(deg, deg[0])
        fig.add_trace(
            go.Scatterpolar(
                r=rr,
                theta=th,
                name=str(name),
                mode="lines+markers",
                marker=dict(size=4),
                hovertemplate=f"θ = %{{theta:.1f}}°<br>{r_label} = %{{r:.4g}}<extra>{name}</extra>",
            )
        )
    fig.update_layout(
        template="instab",
        title=_polar_title(title, r_label),
        polar=dict(
            angularaxis=dict(thetaunit="degrees", direction="counterclockwise", rotation=0),
            radialaxis=_radial_axis(log_r, [_arr(r) for r in rs.values()]),
        ),
    )
    return fig


def _polar_title(title: str, r_label: str) -> dict:
    # A radial-axis title sits on top of the tick labels; name the radius in a subtitle instead.
    return dict(text=title or None, subtitle=dict(text=f"radius: {r_label}" if r_label else None))


def _radial_axis(log_r: bool, values: list[np.ndarray]) -> dict:
    """Radial axis; on a log axis label powers of ten only when the data span a decade or more
    (plotly's default labels every digit, which piles up along a short radius)."""
    if not log_r:
        return dict(type="linear")
    v = np.concatenate([x.ravel() for x in values]) if values else np.array([])
    v = v[np.isfinite(v) & (v > 0)]
    span = np.log10(v.max() / v.min()) if v.size else 0.0
    return dict(type="log", dtick=1 if span >= 1 else "D2")


def radar(
    categories: Sequence[str],
    values: Mapping[str, ArrayLike],
    title: str = "",
    log_r: bool = False,
    r_label: str = "value",
) -> go.Figure:
    """Filled radar chart: one closed polygon per entry of ``values`` over named ``categories``."""
    cats = [str(c) for c in categories]
    fig = go.Figure()
    for name, v in values.items():
        vv = _arr(v)
        fig.add_trace(
            go.Scatterpolar(
                r=np.append(vv, vv[0]) if len(vv) else vv,
                theta=cats + cats[:1],
                name=str(name),
                fill="toself",
                opacity=0.6,
                hovertemplate=f"%{{theta}}<br>{r_label} = %{{r:.4g}}<extra>{name}</extra>",
            )
        )
    fig.update_layout(
        template="instab",
        title=_polar_title(title, r_label),
        polar=dict(radialaxis=_radial_axis(log_r, [_arr(v) for v in values.values()])),
    )
    return fig


def histogram(
    values: Mapping[str, ArrayLike],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "count",
    nbins: int | None = None,
    log_y: bool = False,
    density: bool = False,
) -> go.Figure:
    """Overlaid histograms, one per entry of ``values``; nan values are left out.

    For quantities spanning decades, pass ``np.log10(v)`` and say so in ``xlabel``
    (plotly bins in linear space, so a log x axis would give uneven bins).
    """
    fig = go.Figure()
    for name, v in values.items():
        vv = _arr(v)
        fig.add_trace(
            go.Histogram(
                x=vv[~np.isnan(vv)],
                name=str(name),
                nbinsx=nbins,
                opacity=0.65 if len(values) > 1 else 0.9,
                histnorm="probability density" if density else "",
            )
        )
    fig.update_layout(barmode="overlay")
    return _layout(fig, title, xlabel, "density" if density and ylabel == "count" else ylabel, False, log_y)


def _masks(n: int, groups: Mapping[str, Sequence[int]]) -> dict[str, list[bool]]:
    """Per group, which of ``n`` traces are visible; an index outside 0..n-1 is an error, not a silent no-op."""
    masks = {}
    for label, idx in groups.items():
        bad = [i for i in idx if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"group {label!r} names traces {bad} but the figure has {n} (0..{n - 1})")
        shown = {int(i) for i in idx}
        masks[str(label)] = [i in shown for i in range(n)]
    return masks


def dropdown(fig: go.Figure, groups: Mapping[str, Sequence[int]], all_label: str | None = "all") -> go.Figure:
    """A menu over ``fig``'s traces: choosing a group shows only its traces (indices into ``fig.data``).

    ``all_label`` adds a first entry showing every trace (None: none; the first group is then shown first).
    It works in the offline book: plotly.js switches the traces' visibility, no kernel needed.
    """
    n = len(fig.data)
    masks = _masks(n, groups)
    buttons = []
    if all_label is not None:
        buttons.append(dict(label=all_label, method="update", args=[{"visible": [True] * n}]))
    buttons += [dict(label=label, method="update", args=[{"visible": mask}]) for label, mask in masks.items()]
    if all_label is None and masks:
        for tr, shown in zip(fig.data, next(iter(masks.values()))):
            tr.visible = shown
    fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.12,
                                        yanchor="bottom", showactive=True)])
    return fig


def _combine(figs: Mapping[str, go.Figure], active: int) -> tuple[go.Figure, list[dict[str, Any]]]:
    """One figure holding every figure's traces (layout of the first), and per figure the ``update`` args
    that show only its traces under its own title."""
    if not figs:
        raise ValueError("no figures to switch between")
    labels = list(figs)
    if not 0 <= active < len(labels):
        raise ValueError(f"active={active} but there are {len(labels)} figures")
    out = go.Figure(layout=figs[labels[0]].layout)
    groups: dict[str, list[int]] = {}
    for label in labels:
        start = len(out.data)
        out.add_traces(list(figs[label].data))
        groups[label] = list(range(start, len(out.data)))
    masks = _masks(len(out.data), groups)
    for tr, shown in zip(out.data, masks[str(labels[active])]):
        tr.visible = shown
    # each step also carries its figure's title and axis titles (frames may differ in what their axes are)
    texts = [{"title.text": figs[label].layout.title.text, "xaxis.title.text": figs[label].layout.xaxis.title.text,
              "yaxis.title.text": figs[label].layout.yaxis.title.text} for label in labels]
    out.update_layout({k.replace(".", "_"): v for k, v in texts[active].items()})
    return out, [dict(label=str(label), method="update", args=[{"visible": masks[str(label)]}, t])
                 for label, t in zip(labels, texts)]


def slider(figs: Mapping[str, go.Figure], label: str, active: int = 0) -> go.Figure:
    """One figure with a slider over ``figs`` (step label -> figure, in order: layers, stages, steps): each step
    shows that figure's traces and title. Precomputed frames switched by plotly.js, so it explores offline."""
    fig, steps = _combine(figs, active)
    fig.update_layout(sliders=[dict(active=active, steps=steps, pad=dict(t=60), x=0.0, len=1.0,
                                    currentvalue=dict(prefix=f"{label}: ", font=dict(size=13)))],
                      margin=dict(b=170))
    return fig


def menu(figs: Mapping[str, go.Figure], label: str, active: int = 0) -> go.Figure:
    """One figure with a dropdown over ``figs`` (entry label -> figure: direction pairs, dtypes, models): each
    entry shows that figure's traces and title. Switched by plotly.js, so it explores offline."""
    fig, buttons = _combine(figs, active)
    for b in buttons:
        b["label"] = f"{label}: {b['label']}"
    fig.update_layout(updatemenus=[dict(buttons=buttons, active=active, direction="down", x=1.0, xanchor="right",
                                        y=1.12, yanchor="bottom", showactive=True)])
    return fig
