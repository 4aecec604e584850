"""Transfer learning on images as five DVC stages; importing the package registers its extra model types."""
from stages import efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite with the Auto classes)
