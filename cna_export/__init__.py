"""cna-export: discover Contrastive Neuron Attribution circuits, fold them into weights, export, verify, audit."""

__version__ = "0.1.0"
