"""Making a trained model cheaper: quantization, pruning, and export to llama.cpp's GGUF."""
