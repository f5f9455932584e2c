"""Reference transformer models that optc is developed and tested against.

One file per family (gpt2, llama, bert, opt), each with a `ModelArgs` dataclass and a `CONFIGS`
table of named configs; `models.zoo` builds any of them by name. `models.hf` builds the
Hugging Face counterparts offline (it imports transformers, so it is not imported here).
"""

from __future__ import annotations

from models.zoo import FAMILIES, ZOO_NAMES, build, example_inputs, family_of, model_args

__all__ = ["FAMILIES", "ZOO_NAMES", "build", "example_inputs", "family_of", "model_args"]
