"""The gRPC API: `moe_cluster.proto` and its generated stubs (regenerate with `regenerate.py`)."""
