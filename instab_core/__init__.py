"""instab_core: kernels for studying the numerical instability of large language models.

    import instab_core as ic
    h = ic.load_model("tiny-llama")                 # or a local HF directory, dtype=, device=
    probe = ic.Probe(h, "The capital of France is")  # last token, target = after the final norm
    spec = ic.jacobian.spectrum(probe)               # S, U, Vt of ∂f/∂x0
    res = ic.boundary.first_output_change(probe, spec.directions[:2], s_max=1e-6)
"""

from . import (amplification, boundary, curvature, decision, explore, fisher, fp, injection, jacobian, levelsets,
               linearity, lipschitz, numerics, plots, results, sweep, toys, trace, weights, wordpred)
from .models import BUNDLED, ModelHandle, ModelLoadError, load_model
from .probe import Probe

__all__ = ["BUNDLED", "ModelHandle", "ModelLoadError", "Probe", "amplification", "boundary", "curvature", "decision",
           "explore", "fisher", "fp", "injection", "jacobian", "levelsets", "linearity", "lipschitz", "load_model", "numerics",
           "plots", "results", "sweep", "toys", "trace", "weights", "wordpred"]
__version__ = "0.1.0"
