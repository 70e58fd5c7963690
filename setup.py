"""Install the M-GRPO trainer (package `mgrpo`) and its Triton kernels (package `mgrpo_kernels`).

The kernels live in the top-level folder kernels/ but are installed under the name `mgrpo_kernels`:
`kernels` is also the name of a PyPI distribution (the Hugging Face hub-kernels loader) that transformers
and bitsandbytes import. kernels/ has no __init__.py, so it is not a regular package: from the repository root
an installed `kernels` distribution is always found first (a regular package beats a directory of modules).
"""
from setuptools import find_packages, setup

setup(
    name="mgrpo",
    version="0.1.0",
    description="Memory-efficient single-node M-GRPO (momentum-anchored, label-free GRPO) with fused Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["mgrpo", "mgrpo.*"]) + ["mgrpo_kernels"],
    package_dir={"mgrpo": "mgrpo", "mgrpo_kernels": "kernels"},
    # the embedded default's base model (3.2 MB, sha256 in base.json): the same on every machine
    package_data={"mgrpo.data": ["assets/tiny-qwen3-arith/*"]},
    install_requires=[
        # torch is pinned by the README's install line (the local CPU wheel, or the GPU build vLLM pins);
        # a bare range here would let pip pull a multi-GB CUDA build on a CPU machine.
        "torch>=2.6",
        "triton>=3.2",
        "transformers>=5.16.1,<5.20",
        "huggingface-hub>=1.31",    # model.path as a hub name: reach the hub, or its cache offline (models/loading.py)
        "tokenizers",
        "safetensors",
        "math-verify[antlr4_13_2]>=0.7",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "numpy",
        "bitsandbytes>=0.50",       # 8-bit AdamW (optim.name adamw8bit), runs on CPUs and GPUs
        "liger-kernel>=0.8",        # Triton RMSNorm/RoPE/SwiGLU for the trained model (model.liger)
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "pyarrow",
                 "datasets"],   # a `datasets` name read from the cache offline (tests/test_hub.py)
        "bench": ["trl==1.16.0"],   # the peer trainer bench/bench_trl.py compares against
        "data": ["datasets", "pyarrow"],
    },
    entry_points={"console_scripts": ["mgrpo=mgrpo.commands:run_and_exit"]},
)
