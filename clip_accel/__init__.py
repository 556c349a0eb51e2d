"""clip_accel: fine-tune Hugging Face CLIP on image-text pairs with Accelerate."""

__version__ = "0.1.0"
