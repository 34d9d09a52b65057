"""Peer-to-peer distribution: membership, coordination without a tracker, swarm transfer.

Pure modules (no I/O): ``rendezvous`` (who coordinates a digest), ``auth`` (HMAC of peer
requests), ``messages`` (msgpack metadata), ``planning`` (chunk bitmaps, rarest-first),
``coordinator`` (soft state of holders and upstream leases).
"""
