"""Live explorers for JupyterLab: ipywidgets controls over the kernels, one figure each.

An explorer is controls + a status line + one plotly figure. Moving a control redraws the figure for the
controls' values only: a ray explorer reruns the boundary kernel for that one ray, a grid explorer recomputes the
one window asked for, a stage or step slider only draws precomputed data. While it works the status line says
"computing…", then what it computed and how long it took.

Explorers need a front end. Under papermill (``instab run``, ``make book``) there is none, so a notebook's
explorer cell calls :func:`show`, which prints one line and returns None instead of building widgets: the cell is
skipped, not failed, and the executed notebook carries no dead widget state.

    ic.explore.show(ic.explore.ray_explorer, probe, D, labels=[f"θ = {t:.1f}°" for t in np.degrees(theta)])
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from . import boundary, fp
from . import plots as P
from .book import BATCH_ENV
SKIPPED = "explorer skipped: no front end in a batch run; open this notebook in JupyterLab to use it"


def _parent_cmdline() -> str:
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS, Windows): only the environment variable tells
        return ""


def live() -> bool:
    """True when a front end can show widgets: not under instab's batch runs (``INSTAB_BATCH=1``), not in a
    kernel papermill started (its parent process is papermill)."""
    if os.environ.get(BATCH_ENV) == "1":
        return False
    return "papermill" not in _parent_cmdline()


def show(build: Callable[..., Explorer], *args: Any, **kwargs: Any) -> Explorer | None:
    """Build and display an explorer in a live front end; in a batch run print :data:`SKIPPED` and return None."""
    if not live():
        print(SKIPPED)
        return None
    from IPython.display import display

    explorer = build(*args, **kwargs)
    display(explorer.widget)
    return explorer


class Explorer:
    """Controls, a status line and one figure. ``draw(**values)`` returns the figure for the controls' values
    (``values`` keyed like ``controls``); it is called once at construction and once per control change.

    A ``ValueError`` from ``draw`` (an impossible combination, e.g. an ``s_max`` below the first input change) is
    shown in the status line and leaves the last figure in place. ``figure`` is the figure last drawn, ``draws``
    the number of draws.
    """

    def __init__(self, title: str, controls: Mapping[str, Any], draw: Callable[..., go.Figure]) -> None:
        import ipywidgets as widgets

        self.controls = dict(controls)
        self._draw = draw
        self.figure: go.Figure | None = None
        self.draws = 0
        self.status = widgets.HTML(value="")
        self.output = widgets.Output()
        for w in self.controls.values():
            w.observe(lambda _change: self.refresh(), names="value")
        self.widget = widgets.VBox([widgets.HTML(f"<b>{title}</b>"),
                                    widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap")),
                                    self.status, self.output])
        self.widget.add_class("instab-explorer")
        self.refresh()

    def values(self) -> dict[str, Any]:
        return {name: w.value for name, w in self.controls.items()}

    def refresh(self) -> None:
        from IPython.display import clear_output, display

        self.status.value = "computing…"
        t0 = time.perf_counter()
        try:
            fig = self._draw(**self.values())
        except ValueError as exc:
            self.status.value = f"<span style='color:#b00020'>{exc}</span>"
            return
        self.figure, self.draws = fig, self.draws + 1
        with self.output:
            clear_output(wait=True)
            display(fig)
        self.status.value = f"drawn in {time.perf_counter() - t0:.2f} s"


def _cached(fn: Callable[..., Any], size: int = 64) -> Callable[..., Any]:
    """Memoise ``fn`` on its (hashable) arguments: redrawing for a control that did not change what ``fn``
    computes (a display toggle) costs nothing."""
    memo: dict[Hashable, Any] = {}

    def wrapped(*args: Hashable) -> Any:
        if args not in memo:
            if len(memo) >= size:
                memo.pop(next(iter(memo)))
            memo[args] = fn(*args)
        return memo[args]

    return wrapped


def _log_slider(description: str, value: float, lo: int, hi: int) -> Any:
    import ipywidgets as widgets

    return widgets.FloatLogSlider(value=value, base=10, min=lo, max=hi, step=0.25, description=description,
                                  readout_format=".2e", continuous_update=False)


# ---------------------------------------------------------------------------------------------------------------
# exp12 / exp13: one ray's input states


def ray_figure(states: pd.DataFrame, title: str) -> go.Figure:
    """The input and output change at every distinct input state of a ray (from :func:`boundary.ray_states`),
    on a log-s axis; absorbed states (output bit-identical) and changed ones in two colours."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("output change ‖f(X(s)) − f(x0)‖", "input change ‖X(s) − x0‖"))
    for changed, name, colour in ((False, "absorbed (output bit-identical)", P.PALETTE[2]),
                                  (True, "output changed", P.PALETTE[1])):
        part = states[states.changed == changed]
        hover = "s = %{x:.6g}<br>%{y:.3g}<br>coordinates moved: %{customdata}<extra></extra>"
        fig.add_trace(go.Scatter(x=part.s, y=part.output_l2.where(part.output_l2 > 0), mode="markers", name=name,
                                 marker=dict(color=colour), customdata=part.coords_changed, hovertemplate=hover,
                                 legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=part.s, y=part.input_l2, mode="markers", name=name, showlegend=False,
                                 marker=dict(color=colour), customdata=part.coords_changed, hovertemplate=hover,
                                 legendgroup=name), row=2, col=1)
    # dashed: s_in (the first input change); dotted: s_out (the first output change). The x range is the states',
    # not s_max: past the last state evaluated nothing is known.
    first = states[states.changed]
    if len(first):
        fig.add_vline(x=float(first.s.iloc[0]), line_dash="dot", line_color=P.PALETTE[1])
    if len(states):
        fig.add_vline(x=float(states.s.iloc[0]), line_dash="dash", line_color="#888")
        lo, hi = float(states.s.min()), float(states.s.max())
        fig.update_xaxes(range=[np.log10(lo) - 0.15, np.log10(hi) + 0.15])
    fig.update_xaxes(type="log", title_text="s (dashed: s_in, dotted: s_out)", row=2, col=1)
    fig.update_xaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log")
    fig.update_layout(template="instab", title=title, height=600, margin=dict(t=110))
    return fig


def ray_explorer(probe: Any, D: torch.Tensor | np.ndarray, labels: Sequence[str] | None = None,
                 s_max: float = 1e-6, mode: fp.Mode = "fp64", threshold: float = 0.0,
                 max_states: int = 256) -> Explorer:
    """Pick a ray (rows of ``D`` [R, d], named by ``labels``) and see every distinct input state along it up to
    ``s_max``: which the network absorbed and the output change at each (:func:`boundary.ray_states`, one kernel
    call for that ray: ceil(states / batch_size) forward passes). ``s_max``, ``mode`` and ``threshold`` are
    controls too; changing them reruns the kernel for the shown ray only."""
    import ipywidgets as widgets

    D = torch.as_tensor(D)
    labels = list(labels) if labels is not None else [f"ray {i}" for i in range(D.shape[0])]
    if len(labels) != D.shape[0]:
        raise ValueError(f"{len(labels)} labels for {D.shape[0]} rays")
    controls = {
        "ray": widgets.SelectionSlider(options=list(zip(labels, range(len(labels)))), value=0, description="ray",
                                       continuous_update=False, layout=widgets.Layout(width="420px")),
        "s_max": _log_slider("s_max", s_max, -10, -2),
        "mode": widgets.Dropdown(options=list(fp.MODES), value=mode, description="mode"),
        "threshold": widgets.FloatText(value=threshold, description="threshold"),
    }
    states_of = _cached(lambda ray, s, m, t: boundary.ray_states(probe, D[ray], s, mode=m, threshold=t,
                                                                 max_states=max_states))

    def draw(ray: int, s_max: float, mode: str, threshold: float) -> go.Figure:
        states = states_of(ray, float(s_max), mode, float(threshold))
        changed = np.flatnonzero(states.changed.to_numpy())
        first = (f"first output change at state {changed[0] + 1} (s = {states.s.iloc[changed[0]]:.6g}), "
                 f"{changed[0]} absorbed before it" if changed.size else "output never changed")
        which = (f"the first {len(states)} input states (max_states; s_max = {s_max:.3g})" if len(states) == max_states
                 else f"all {len(states)} input states up to s_max = {s_max:.3g}")
        return ray_figure(states, f"{labels[ray]}: {which}<br>{first}")

    return Explorer("Input states along one ray", controls, draw)


# ---------------------------------------------------------------------------------------------------------------
# exp07: the gap grid on a window


def gap_grid_explorer(probe: Any, x: torch.Tensor, D: torch.Tensor, pairs: Sequence[tuple[int, int]],
                      pair: tuple[int, int], half_width: float = 1e-8, cells: int = 41,
                      mode: str = "fp32") -> Explorer:
    """The gap G = logit[t1] − logit[t2] on the window [c_a ± w] × [c_b ± w] around ``x`` along singular
    directions (``D`` rows, 1-based ``pairs``), recomputed by :func:`decision.gap_grid` for each window — a true
    zoom, not a resampling — with the input-lattice overlay (where the float input changes to the next cell) as a
    toggle that does not recompute. ``cells`` per axis (cells² forward rows per window)."""
    import ipywidgets as widgets

    from . import decision as dc

    controls = {
        "pair": widgets.Dropdown(options=[(f"v{i}, v{j}", (i, j)) for i, j in pairs], value=tuple(pairs[0]),
                                 description="pair"),
        "half_width": _log_slider("half width", half_width, -12, -4),
        "centre_a": widgets.FloatText(value=0.0, description="centre a"),
        "centre_b": widgets.FloatText(value=0.0, description="centre b"),
        "cells": widgets.IntSlider(value=cells, min=11, max=201, step=10, description="cells/axis",
                                   continuous_update=False),
        "lattice": widgets.Checkbox(value=True, description="input lattice"),
    }

    def compute(ij: tuple[int, int], w: float, ca: float, cb: float, n: int) -> Any:
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"the half width must be positive, got {w}")
        a, b = dc.grid_axis(ca - w, ca + w, n=n), dc.grid_axis(cb - w, cb + w, n=n)
        return dc.gap_grid(probe, x, D[ij[0] - 1], D[ij[1] - 1], a, b, pair=pair, mode=mode, audit=False)

    grid_of = _cached(compute, size=16)

    def draw(pair: tuple[int, int], half_width: float, centre_a: float, centre_b: float, cells: int,
             lattice: bool) -> go.Figure:
        g = grid_of(tuple(pair), float(half_width), float(centre_a), float(centre_b), int(cells))
        i, j = pair
        fig = P.heatmap(np.asarray(g.G).T, x=g.a, y=g.b, zmid=0.0, xlabel=f"a (along v{i})", ylabel=f"b (along v{j})",
                        zlabel="G", title=f"G on [{centre_a:g} ± {half_width:.3g}] × [{centre_b:g} ± {half_width:.3g}]: "
                                         f"{g.n_states} distinct inputs in {g.G.size} cells, {g.seconds:.2f} s")
        if lattice:
            edges = np.isfinite(dc.input_edges(g.state)).T.astype(np.uint8)
            fig.add_trace(go.Heatmap(z=edges, x=g.a, y=g.b, zmin=0, zmax=1, showscale=False, hoverinfo="skip",
                                     colorscale=[[0, "rgba(0,0,0,0)"], [1, "rgba(30,30,30,0.35)"]],
                                     name="input changes to the next cell"))
        return fig

    return Explorer("Gap grid on a window (recomputed)", controls, draw)


# ---------------------------------------------------------------------------------------------------------------
# exp01 / exp05 / exp11 / exp04 / exp08: a slider over precomputed frames


def frame_explorer(title: str, keys: Sequence[Any], draw: Callable[[Any], go.Figure], label: str,
                   start: Any = None) -> Explorer:
    """A slider over ``keys`` (stages, layers, steps) drawing ``draw(key)`` from data already computed: no kernel
    runs, and each frame is drawn once (cached)."""
    import ipywidgets as widgets

    keys = list(keys)
    if not keys:
        raise ValueError("frame_explorer needs at least one key")
    start = keys[0] if start is None else start
    slider = widgets.SelectionSlider(options=[(str(k), k) for k in keys], value=start, description=label,
                                     layout=widgets.Layout(width="520px"))
    frame = _cached(draw, size=len(keys))
    return Explorer(title, {"key": slider}, lambda key: frame(key))


def stage_sweep_frames(sw: Any, row_labels: Sequence[str]) -> dict[str, go.Figure]:
    """Per stage of a :class:`sweep.Sweep`, a heatmap of log10 |Δ| per coordinate (columns) for every perturbation
    of the sweep (rows, named by ``row_labels``), all on one colour range: the frames of exp01 / exp05's stage
    slider, in the book (:func:`plots.slider`) and live (:func:`stage_sweep_explorer`)."""
    deltas = {s: np.asarray(sw.delta(s), dtype=np.float64) for s in sw.stages}
    positive = np.concatenate([d[d > 0] for d in deltas.values()])
    lo, hi = (float(np.log10(positive.min())), float(np.log10(positive.max()))) if positive.size else (0.0, 1.0)
    frames = {}
    for stage, d in deltas.items():
        fig = P.heatmap(np.log10(np.where(d > 0, d, np.nan)).astype(np.float32), x=np.arange(d.shape[1]),
                        y=list(row_labels), title=f"{stage}: log10 |Δ| per coordinate ({int((d > 0).sum())} of {d.size} "
                                                  "changed; blank: bit-identical)",
                        xlabel="coordinate", ylabel="", zlabel="log10 |Δ|")
        frames[stage] = fig.update_traces(zmin=lo, zmax=hi)
    return frames


def stage_sweep_explorer(sw: Any, row_labels: Sequence[str]) -> Explorer:
    """exp01 / exp05: a stage slider over :func:`stage_sweep_frames` (nothing recomputed)."""
    frames = stage_sweep_frames(sw, row_labels)
    return frame_explorer("Change per coordinate at one stage", list(frames), frames.__getitem__, "stage")


def frame_steps(last_step: int, count: int = 50) -> list[int]:
    """At most ``count`` steps spread over 0..last_step, ``last_step`` (the divergence) included."""
    return sorted({int(round(t)) for t in np.linspace(0, last_step, min(count, last_step + 1))} | {last_step})


def trace_step_frames(c: Any, steps: Sequence[int], metric: str = "rel_l2") -> dict[int, go.Figure]:
    """Per step of a trace pair (:class:`trace.Comparison`), the stage-by-stage difference ``metric`` on one
    fixed log axis: exp04 / exp08's step slider, in the book and live (:func:`trace_step_explorer`)."""
    curve = c.curve(metric)
    values = curve.to_numpy(dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    y_range = [float(np.log10(values.min())) - 0.5, float(np.log10(values.max())) + 0.5] if values.size else None
    frames = {}
    for step in steps:
        row = curve.loc[step]
        fig = P.line([], {}, title=f"step {step}: {metric} between the two runs at every stage"
                                   f"{' (the divergence step)' if step == c.divergence else ''}",
                     xlabel="stage (network order)", ylabel=metric, log_y=True)
        fig.add_scatter(x=list(row.index), y=row.where(row > 0).to_numpy(dtype=np.float64), mode="lines+markers",
                        name=metric)  # zero (bit-identical) stages are gaps on the log axis
        fig.update_xaxes(type="category")
        frames[int(step)] = fig.update_yaxes(range=y_range) if y_range else fig
    return frames


def trace_step_explorer(c: Any, metric: str = "rel_l2") -> Explorer:
    """exp04 / exp08: a step scrubber over every compared step of a trace pair, each frame drawn when first shown
    (:func:`trace_step_frames`); it opens on the last compared step (the divergence)."""
    steps = list(c.curve(metric).index)
    return frame_explorer("Stage-by-stage difference at one step", steps,
                          lambda step: trace_step_frames(c, [step], metric)[step], "step", start=steps[-1])


# ---------------------------------------------------------------------------------------------------------------
# fisher / linearity: one kernel call per setting


def fisher_explorer(h: Any, st: Any, word: str, alpha: float = 1.0, top: int = 8) -> Explorer:
    """fisher_directions: pick a layer, a kept sentence and a step α (units of λ₁) along that sentence's exact top
    Fisher eigenvector; one forward pass (:func:`fisher.sweep`) gives the next-token distribution there and its
    KL from the unperturbed one."""
    import ipywidgets as widgets

    from . import fisher as fi

    kept = st.sites.index[st.sites.used].tolist()
    if not kept:
        raise ValueError("no sentence was kept by the study: nothing to explore")
    controls = {
        "layer": widgets.Dropdown(options=list(st.layers), value=st.layers[0], description="layer"),
        "site": widgets.Dropdown(options=[(f"{i}: {st.sites.text[i][:40]}", n) for n, i in enumerate(kept)], value=0,
                                 description="sentence"),
        "alpha": widgets.FloatSlider(value=alpha, min=-4.0, max=4.0, step=0.1, description="α (×λ₁)",
                                     continuous_update=False),
    }
    site_of = _cached(lambda n: fi.find_site(h, st.sites.text[kept[n]], word))
    resid_of = _cached(lambda n, layer: fi.residual(h, site_of(n).ids, layer, site_of(n).position))
    eig = st.eigen[st.eigen["rank"] == 1].set_index(["site", "layer"]).eigenvalue

    def draw(layer: int, site: int, alpha: float) -> go.Figure:
        lam = float(eig.loc[(kept[site], layer)])
        v = st.vectors[layer][site]
        row = fi.sweep(h, site_of(site), layer, resid_of(site, layer), v, [alpha * lam], top=top).iloc[0]
        fig = go.Figure(go.Bar(x=[repr(t) for t in row.top_tokens], y=row.top_probs, marker_color=P.PALETTE[0]))
        return P._layout(fig, f"layer {layer}, step {alpha:g}·λ₁ (λ₁ = {lam:.3g}): KL = {row.kl:.3g} nats"
                              f"{', argmax changed' if row.argmax_changed else ''}", "next token", "probability",
                         False, False).update_yaxes(range=[0, 1])

    return Explorer("Next token along the top Fisher eigenvector", controls, draw)


def linearity_explorer(h: Any, prompts: list[str], scopes: Sequence[str], num_directions: int, seed: int = 0,
                       radius: float = 1e-2, positions: str = "last") -> Explorer:
    """linearity_radius: pick a parameter scope, one of its random directions δ and a radius r; the true logit
    change f(θ + rδ) − f(θ) against the first-order prediction r·Jδ, coordinate by coordinate. One jvp per
    (scope, direction), then one forward per radius (:func:`linearity.step_response`)."""
    import ipywidgets as widgets

    from . import linearity as L

    controls = {
        "scope": widgets.Dropdown(options=list(scopes), value=scopes[0], description="scope"),
        "direction": widgets.IntSlider(value=0, min=0, max=num_directions - 1, description="direction",
                                       continuous_update=False),
        "radius": _log_slider("radius r", radius, -4, 1),
    }
    response_of = _cached(lambda scope, k: L.step_response(h, prompts, scope, k, num_directions, seed,
                                                           positions=positions), size=16)

    def draw(scope: str, direction: int, radius: float) -> go.Figure:
        d_true, d_pred = response_of(scope, int(direction)).at(float(radius))
        relerr, cos = L.relerr_cos(d_true, d_pred)
        t, p = d_true.double().reshape(-1).cpu().numpy(), d_pred.double().reshape(-1).cpu().numpy()
        fig = P.scatter(p, t, title=f"{scope}, direction {direction}, r = {radius:.3g}: relative error "
                                    f"{float(np.mean(relerr)):.3g}, cosine {float(np.mean(cos)):.6f}",
                        xlabel="predicted r·Jδ (logit)", ylabel="true Δ logit")
        lim = float(np.nanmax(np.abs(np.concatenate([t, p])))) if t.size else 1.0
        fig.add_scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="true = predicted", line=dict(dash="dot"))
        return fig

    return Explorer("True logit change against the first-order prediction", controls, draw)
