"""dgkit: distill CLIP into small, domain-robust image classifiers and ship them to the edge."""

from dgkit.errors import DgkitError

__version__ = "0.1.0"
__all__ = ["DgkitError", "__version__"]
