"""What a portable case directory holds (stdlib only: imported on both sides).

Written in the main environment by ``python -m tests.coordinator.portable_cases --out DIR``
(onnxruntime-training + torch), read by the tests here, which run on plain onnxruntime:

    ops/index.json, ops/<case>.onnx, ops/<case>.npz    lowered operator graphs; "in:<name>" inputs and
                                                        "out:<name>" outputs of ORT's training kernel
    segments/<case>/bundle/                            a portable bundle of a registry model's (or the tiny GPT's) segment
    segments/<case>/{weights,data,expected}.npz        start weights, batch, OrtTrainer's result
    toy/<segment>/bundle/, toy/ort_bundle/, toy/data.npz   toy-model bundles for trainer behaviour tests
"""

from __future__ import annotations

ENV_CASES = "SNAKELEARN_PORTABLE_CASES"  # the case directory the portable tests read
ENV_PYTHON = "SNAKELEARN_PORTABLE_PYTHON"  # a plain-onnxruntime interpreter for the cross-environment run

SEGMENT_CASES: dict[str, tuple[str, tuple[str, ...], int, int, str, int, float]] = {
    # case: (model, layer groups, samples, batch, optimizer, epochs, learning rate)
    "mlp_sgd": ("mlp", ("fc1", "head"), 16, 16, "sgd", 1, 0.1),
    "cnn_sgd": ("cnn", ("conv0", "fc"), 16, 16, "sgd", 1, 0.1),
    "vgg11_sgd": ("vgg11", ("features.6", "features.7", "classifier.0"), 8, 8, "sgd", 1, 0.1),
    "cnn_adamw": ("cnn", ("conv1", "fc"), 16, 16, "adamw", 3, 1e-3),
    "dropout_sgd": ("vgg_dropout", ("classifier.0", "classifier.1"), 32, 8, "sgd", 1, 0.1),  # 4 steps, 2 dropouts
    # the tiny GPT (tests/coordinator/gpt_tiny.py): token ids [N, 16], labels with padding (-100)
    "gpt_embed_sgd": ("gpt_tiny", ("embed",), 8, 4, "sgd", 1, 0.1),  # tied head: through every block
    "gpt_all_sgd": ("gpt_tiny", ("embed", "blocks.0", "blocks.1", "head"), 4, 4, "sgd", 1, 0.1),
    "gpt_blocks_adamw": ("gpt_tiny", ("blocks.1", "head"), 8, 4, "adamw", 2, 1e-3),
}
SGD_TOLERANCE = 1e-5  # max |portable - OrtTrainer| over every tensor
ADAMW_TOLERANCE = 1e-6  # for all but 1e-4 of the elements (Adam amplifies float noise in |g| ~ eps)
# ... or all but 32: a GPT's key bias (width 32 in the tiny GPT) has no true gradient (softmax ignores a
# shift), so Adam turns its float noise into steps (measured: 6 elements of 12,768 above 1e-6, at most 1.8e-6)
ADAMW_MIN_OUTLIERS = 32

TOY_FEATURES, TOY_CLASSES = 4, 3
TOY_SEGMENTS: dict[str, tuple[tuple[str, ...], str, bool]] = {  # name: (trainable, optimizer, batchnorm)
    "all_adamw": (("fc0.weight", "fc0.bias", "head.weight", "head.bias"), "adamw", False),
    "head_sgd": (("head.weight", "head.bias"), "sgd", False),
    "head_bn": (("head.weight", "head.bias"), "adamw", True),
    "bn_only": (("bn.weight", "bn.bias"), "adamw", True),
}
