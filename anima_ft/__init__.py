"""anima_ft: distributed full fine-tuning for Anima (Cosmos-Predict2-2B DiT + LLM adapter)."""

__version__ = "0.1.0"
