"""maskrun: does freezing part of a pretrained transformer while fine-tuning reduce interference?"""

__version__ = "0.1.0"
