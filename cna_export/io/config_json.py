"""A checkpoint's ``config.json`` read without transformers, where the file alone says what an identity needs.

Importing transformers costs about 2 s of CPU, and a safetensors export needs from the config only the family
(``model_type``), the layer count and whether the MLP has experts; the shapes come from the safetensors
headers. A config written by ``save_pretrained`` always carries its model's own keys (only keys that
``PretrainedConfig`` itself defines are left out when they hold the default), so it is read here as it is.
Anything that might depend on transformers' classes goes to ``AutoConfig`` instead: custom code
(``auto_map``), a nested ``text_config``, a family the architecture table does not know as dense, a
mixture-of-experts key, or a missing or odd layer count.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from ..core.architectures import MOE_CONFIG_KEYS, get_arch
from ..core.errors import CnaError


def plain_config(folder: Path) -> SimpleNamespace | None:
    """``folder/config.json`` as attributes when it alone describes a dense model of a known family, else None
    (read it with ``AutoConfig``, which also reports what is wrong with it)."""
    try:
        data = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or "auto_map" in data or "text_config" in data:
        return None
    model_type, layers = data.get("model_type"), data.get("num_hidden_layers")
    if not isinstance(model_type, str) or type(layers) is not int or layers <= 0:
        return None
    if any(k in data for k in MOE_CONFIG_KEYS):
        return None
    try:
        if get_arch(model_type).moe is not None:
            return None
    except CnaError:
        return None
    return SimpleNamespace(**data)
