"""Reading trained scale vectors: statistics, preconditioner bounds, role-aware quantization."""
