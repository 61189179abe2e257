"""Redundancy across nodes: the Reed–Solomon erasure codec (more to come: groups, placement)."""

from ckpt.redundancy.codec import RSCodec, available_isas, cauchy_matrix, default_isa

__all__ = ["RSCodec", "available_isas", "cauchy_matrix", "default_isa"]
