"""The Llama-style decoder built from scalejax norms: typed ModelConfig, layers, MoE,
decoder, the wiring of scales to the maps they feed, analytic counts, sampling."""
