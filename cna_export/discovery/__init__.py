"""Circuit discovery: per-neuron activation statistics over contrastive prompt sets, the
universal-neuron filter, scoring and selection of the circuit.
"""
