"""Bundled tiny models (weights + tokenizer), trained locally by ``python -m instab_core.zoo.train``."""
from __future__ import annotations

from pathlib import Path

ZOO_DIR: Path = Path(__file__).resolve().parent
BUNDLED: dict[str, Path] = {name: ZOO_DIR / name for name in ("tiny-llama", "tiny-gpt2")}
