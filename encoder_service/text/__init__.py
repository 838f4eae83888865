"""Text embeddings of the captions, beside the latents (text/encoder.py)."""
