"""Models: the Encoder interface, our towers, the pretrained and Hugging Face towers, loading and saving."""
