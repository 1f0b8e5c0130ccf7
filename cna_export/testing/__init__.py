"""Fixtures shared by the tests (``tests/``) and the benchmarks (``bench/``); not used by the library.

* :mod:`cna_export.testing.abliterate`: abliteration as other tools ship it, from the published math;
* :mod:`cna_export.testing.gguf_twin`: GGUF twins of the tiny test models, written as llama.cpp's converter does.

This package is the top stage of the layering (``tests/test_layering.py``): it may import any module of
``cna_export``, and no module of ``cna_export`` may import it. Heavy imports (torch, transformers,
llama_cpp) stay inside the functions that need them.
"""
