from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="loop-trl",
    version="0.1.0",
    description="Reinforcement learning for text-to-image diffusion models with LOOP (leave-one-out PPO), TRL-style.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"loop_trl.testbeds.shapes": ["model/*.json", "model/*/*.json", "model/*/*.safetensors", "model/*/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # a lower bound only: users pick the CUDA/CPU build they need
        "diffusers>=0.42",
        "transformers>=5.0",
        "accelerate>=1.10",
        "peft>=0.17",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "trl>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",  # reward curves and benchmark plots
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "scipy", "tensorboard", "hypothesis", "matplotlib", "rapidocr_onnxruntime>=1.4", "werkzeug>=3",
                 "requests>=2.31", "mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],  # the API reference site
        "server": ["werkzeug>=3", "requests>=2.31"],  # the reward server and RemoteReward
        "ocr": ["rapidocr_onnxruntime>=1.4"],  # OCRReward: ships its ONNX models, runs offline
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
