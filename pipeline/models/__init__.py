"""Models: a ResNet and its plain twin (``resnet``), and an SVM baseline (``svm``)."""

from pipeline.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    build_resnet,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnet1202,
)
from pipeline.models.svm import SVMClassifier, image_features, load_svm, save_svm

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "SVMClassifier",
    "build_resnet",
    "image_features",
    "load_svm",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
    "resnet1202",
    "save_svm",
]
