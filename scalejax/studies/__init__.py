"""Study commands (ablation, quantization, inspection) and the helpers they share."""
