"""Transfer learning on images as DVC stages (stages/*.py); `python -m stages.<name>` runs one.

Importing the package imports nothing else, so a stage pays only for what it uses. The modules that
load a model import `stages.efficientnet_lite`, which registers EfficientNet-Lite with the Auto
classes; do the same before loading an exported EfficientNet-Lite model yourself.
"""
