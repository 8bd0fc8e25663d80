"""Study commands (ablation, quantization, inspection) and the code they share (`common`)."""
