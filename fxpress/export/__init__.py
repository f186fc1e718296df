"""Export compressed graphs back to the formats users load: Hugging Face folders, safetensors."""
