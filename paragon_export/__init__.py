"""paragon-export: ship ParagonSR2 super-resolution models.

Importing this package must stay cheap and must never import tensorrt or modelopt.
"""

__version__ = "0.1.0"
