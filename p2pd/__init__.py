"""p2pd: peer-to-peer container image distribution (node agent) and the shared OCI core."""

__version__ = "0.1.0"
