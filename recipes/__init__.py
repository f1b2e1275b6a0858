"""Training / evaluation recipes for qtoolkit (models, data, FP32 training, checkpoints).

Example:
    >>> from recipes.models import build_model
    >>> model = build_model("resnet20", num_classes=10, in_channels=1)
"""
