"""Packaging for charlstm: a character-level LSTM trainer, exporter and serving clients."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

setup(
    name="charlstm",
    version="0.1.0",
    description="Train character-level LSTM language models with TensorFlow and serve them "
                "with TensorFlow Serving.",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "export", "export.*",
                                    "serving", "serving.*"]),
    package_data={"trainer": ["data/*.txt"]},
    # Tested with tensorflow 2.21, keras 3.15, tensorflow-datasets 4.9.10,
    # tensorboard 2.21, absl-py 2.5 and numpy 2.4 on Python 3.11.
    install_requires=[
        "tensorflow>=2.20,<2.22",
        "keras>=3.10,<4",
        "tensorboard>=2.20,<2.22",
        "tensorflow-datasets>=4.9.8,<5",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
    ],
    extras_require={
        "serving": ["tensorflow-serving-api>=2.20,<2.22", "grpcio>=1.60,<2"],
        "test": ["pytest>=8,<10", "tensorflow-serving-api>=2.20,<2.22", "grpcio>=1.60,<2"],
    },
    entry_points={
        "console_scripts": [
            "charlstm-train=trainer.task:run_main",
            "charlstm-export=export.__main__:run_main",
            "charlstm-generate=serving.generate:run_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
