"""tokenzoo: token-efficient Vision Transformers for timm, OpenMMLab and ONNX.

The import package ``tokenzoo`` is the ``models/`` folder and ``tokenzoo.export`` is ``export/`` (the top level of the
repository is prescribed, so the folders keep their names and setuptools maps them).
"""
from setuptools import setup

setup(
    name="tokenzoo",
    version="0.1.0",
    description="A model zoo of token-efficient Vision Transformers (EViT, ToMe, MCTF, Expedit, Sparsifiner, "
                "LookupViT) for timm, OpenMMLab and onnxruntime",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["tokenzoo", "tokenzoo.layers", "tokenzoo.mm", "tokenzoo.export", "tokenzoo.classification"],
    package_dir={"tokenzoo": "models", "tokenzoo.export": "export"},
    install_requires=["torch>=2.4", "torchvision", "timm>=1.0.31,<1.1", "numpy"],
    extras_require={
        # mmdet 3.3 / mmseg 1.2 refuse mmcv >= 2.2; mmseg imports ftfy and regex without declaring them;
        # mmcv and mmengine import pkg_resources, gone from setuptools 82.
        "mm": ["mmengine>=0.10.7,<0.11", "mmcv>=2.1.0,<2.2.0", "mmdet>=3.3.0,<3.4", "mmsegmentation>=1.2.2,<1.3",
               "ftfy", "regex", "pycocotools", "setuptools<82"],
        # scikit-image: its bundled photographs are the real images for INT8 calibration, agreement figures and
        # token pictures (no download); matplotlib draws the zoo's plots and the token pictures; tqdm shows progress
        "export": ["onnx>=1.23", "onnxruntime>=1.31", "onnxscript>=0.7", "onnxslim", "scikit-image>=0.25",
                   "matplotlib", "tqdm"],
        # classification tools: the digits ship inside scikit-learn's wheel; matplotlib draws the trade-off plot
        "cls": ["scikit-learn", "matplotlib", "tqdm"],
        "dev": ["pytest>=8", "pytest-timeout"],
    },
)
