from setuptools import find_packages, setup

setup(
    name="jaxdiff",
    version="0.1.0",
    description="Diffusion and flow generative models in JAX: processes, samplers, guidance.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxdiff", "jaxdiff.*"]),
    install_requires=[
        "jax>=0.10.2",
        "numpy>=1.26",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5.0",
        "grain>=0.2.6",
        "ml-collections>=0.1.1",
        "chex>=0.1.88",
        "absl-py>=2.0",
        "diffrax>=0.7.0",
        "scikit-learn>=1.3",
        "pillow>=10.0",
        "matplotlib>=3.8",  # eval sweep / plot figures
        "qwix==0.1.8",  # post-training quantization (jaxdiff.accel.quant, jaxdiff quantize)
        "safetensors>=0.4",  # diffusers/transformers model folders (jaxdiff.interop.folders)
        "tokenizers>=0.20",  # their tokenizer files (CLIP BPE), for text-to-image pipelines
    ],
    package_data={"jaxdiff.eval": ["digits_features.npz"]},
    entry_points={"console_scripts": ["jaxdiff=jaxdiff.cli:entry"]},
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6", "nbclient>=0.10", "nbformat>=5.9",
                 "ipykernel>=6.0", "tensorboard>=2.15"],
        # PyTorch reference implementations for parity tests and baselines. torch==2.13.0 is the
        # CPU build available on the project machines; any other spec pulls CUDA packages.
        # torchsde, torchdiffeq, tqdm: what k-diffusion's sampling module imports (k-diffusion
        # itself is installed without its heavy dependencies by the Makefile's test target).
        "parity": ["torch==2.13.0", "diffusers>=0.35", "transformers>=5.0", "torchsde==0.2.6", "torchdiffeq==0.2.5",
                   "tqdm>=4.60"],
    },
)
