"""Pure OCI Distribution core shared by seed/ and p2pd/.

Nothing in this package performs I/O or imports trio, httpx or zeroconf (a layering test
enforces it): grammar, digests, media types, error codes, Range parsing, manifest
validation and chunk maps take values and return values.
"""
