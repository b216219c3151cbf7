"""Secure aggregation inside one cloud (DESIGN.md §4), IO-free.

Primitives, one module each: :mod:`.shamir` (threshold sharing), :mod:`.keystream` (mask
expansion with AES-256-CTR), :mod:`.share_box` (per-neighbour share encryption),
:mod:`.mask_keys` (pairwise and self-mask keys), :mod:`.graph` (neighbour graph from a public
seed), :mod:`.encoding` (clip, quantize, wrap). The two protocol state machines are
:mod:`.participant` (agent side) and :mod:`.aggregator` (coordinator side).
"""
