"""Inspection of third-party checkpoints: ``diff`` (tensor by tensor, recovering scaled
neurons and directional edits), ``audit`` (one verdict: manifest check, diff against a base,
refusal-circuit overlap, refusal rate) and ``scan`` (base-free signs of steering).
"""
