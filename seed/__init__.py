"""seed: the central OCI Distribution registry that every p2pd node falls back to."""
