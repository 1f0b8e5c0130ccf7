"""cna-export: discover Contrastive Neuron Attribution circuits, fold them into weights, export, verify, audit."""

from .core.version import __version__

__all__ = ["__version__"]
