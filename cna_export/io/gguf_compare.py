"""Exact comparison of two GGUF files: KV pairs (raw bytes, types, order) and tensors (names, order,
types, shapes and bytes). Each difference is one line of text for a report."""

from __future__ import annotations

from typing import Any, Iterable

from .gguf_read import kv_fields, np_shape, tensor_map, type_name
from .tensor_bytes import arrays_equal_bytes


def kv_differences(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[str]:
    """Differences between the KV pairs of two files (raw bytes, types and order), ignoring ``ignore``.

    Keys present in only one file (and not ignored) are reported, as are keys in a different order.
    """
    skip = set(ignore)
    fa = [f for f in kv_fields(a) if f.name not in skip]
    fb = [f for f in kv_fields(b) if f.name not in skip]
    out: list[str] = []
    names_a, names_b = [f.name for f in fa], [f.name for f in fb]
    for name in sorted(set(names_a) - set(names_b)):
        out.append(f"key {name} is missing")
    for name in sorted(set(names_b) - set(names_a)):
        out.append(f"key {name} was added")
    common_a = [n for n in names_a if n in set(names_b)]
    common_b = [n for n in names_b if n in set(names_a)]
    if common_a != common_b:
        out.append("keys are in a different order")
    bmap = {f.name: f for f in fb}
    for f in fa:
        g = bmap.get(f.name)
        if g is not None and f.raw() != g.raw():
            out.append(f"key {f.name} differs (type {f.type.name} -> {g.type.name})")
    if int(a.alignment) != int(b.alignment):
        out.append(f"alignment differs ({a.alignment} -> {b.alignment})")
    return out


def tensor_differences(a: Any, b: Any, ignore_data: Iterable[str] = (), data: bool = True) -> list[str]:
    """Differences in tensor names, order, types, shapes and (unless ``data`` is off, except ``ignore_data``) bytes."""
    skip = set(ignore_data)
    out: list[str] = []
    ta, tb = tensor_map(a), tensor_map(b)
    for name in sorted(set(ta) - set(tb)):
        out.append(f"tensor {name} is missing")
    for name in sorted(set(tb) - set(ta)):
        out.append(f"tensor {name} was added")
    if [t.name for t in a.tensors if t.name in tb] != [t.name for t in b.tensors if t.name in ta]:
        out.append("tensors are in a different order")
    for name, x in ta.items():
        y = tb.get(name)
        if y is None:
            continue
        if x.tensor_type != y.tensor_type or x.ne != y.ne:
            out.append(f"tensor {name} changed from {type_name(x)} {np_shape(x)} to {type_name(y)} {np_shape(y)}")
        elif data and name not in skip and not arrays_equal_bytes(x.data, y.data):
            out.append(f"tensor {name} bytes differ")
    return out
