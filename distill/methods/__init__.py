"""Methods register themselves on import; every module in this folder is one method."""

import importlib
import pkgutil

from dgkit.distill.methods.base import (
    Batch,
    Method,
    MethodContext,
    get_method,
    hparams_dict,
    method_names,
    parse_hparams,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Batch", "Method", "MethodContext", "get_method", "hparams_dict", "method_names",
           "parse_hparams"]
