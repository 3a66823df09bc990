"""Weight conversion between meditron-jax and the Hugging Face / Meta formats."""
