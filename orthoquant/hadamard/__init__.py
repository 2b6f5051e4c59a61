"""Hadamard matrices of order K·2^m and their fast application (see DESIGN §6).

``Had_n = (H_K ⊗ H_{2^m}) / √n`` (K the slow index) is built by :mod:`.construct`;
:mod:`.fwht` applies it in the row-vector convention ``x → x @ Had_n`` in O(n log n).
"""
from .construct import (
    MAX_K,
    block_hadamard,
    hadamard_base,
    hadamard_digest,
    hadamard_factor,
    hadamard_matrix,
    hadamard_source,
    is_pow2,
    stored_orders,
)
from .fwht import (
    apply_hadamard,
    apply_hadamard_ref,
    apply_hadamard_transpose,
    apply_hadamard_transpose_ref,
    apply_random_hadamard,
    apply_random_hadamard_ref,
    apply_random_hadamard_transpose,
    random_signs,
)

__all__ = [
    "MAX_K",
    "apply_hadamard",
    "apply_hadamard_ref",
    "apply_hadamard_transpose",
    "apply_hadamard_transpose_ref",
    "apply_random_hadamard",
    "apply_random_hadamard_ref",
    "apply_random_hadamard_transpose",
    "block_hadamard",
    "hadamard_base",
    "hadamard_digest",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_source",
    "is_pow2",
    "random_signs",
    "stored_orders",
]
