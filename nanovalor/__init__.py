"""nanovalor: VALOR (arXiv 2512.16201) two-stage GRPO post-training of a chest X-ray report VLM, from scratch."""
