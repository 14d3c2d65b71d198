"""megatron_bluelm: 3D-parallel training of BlueLM-2.5-3B-style multimodal models on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_bluelm",
    version="0.1.0",
    description="Training codebase for BlueLM-2.5-3B-style models on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_bluelm*", "bluelm_kernels*", "tools*"]),
    package_data={"megatron_bluelm": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[
        # torch is pinned by the Makefile for CPU installs (torch==2.13.0); any 2.x >= 2.6 works here.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "pillow",
        "tensorboard",
        "psutil",  # megatron-core's torch_dist checkpoint writer calls it on every save
        "sympy",  # math answer equivalence (eval/graders.py, shared with RL rewards)
        "matplotlib",  # evaluation and training-metric plots (tools/evaluate.py, tools/plot_metrics.py)
    ],
    extras_require={
        "gpu": ["triton"],
        # Tested in CI on both ends (tests/checkpoint/test_hf.py): 4.57.1 (text export, from
        # .deps/transformers-oldest, which `make install` fills) and the newest installed (5.24.0:
        # text and multimodal). The multimodal (Lfm2Vl) export needs transformers 5: 4.57's Lfm2Vl has
        # no projector_use_layernorm and other vision-tower weight names.
        "hf": ["transformers>=4.57.1", "safetensors"],
        "dev": ["pytest", "triton", "transformers>=4.57.1", "safetensors", "zstandard", "ruff"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "bluelm-pretrain=megatron_bluelm.stages.pretrain:main",
            "bluelm-sft=megatron_bluelm.stages.sft:main",
            "bluelm-multimodal=megatron_bluelm.stages.multimodal:main",
            "bluelm-rl=megatron_bluelm.stages.rl:main",
            "bluelm-reward-model=megatron_bluelm.stages.reward_model:main",
            "bluelm-preprocess=tools.preprocess_data:main",
            "bluelm-train-tokenizer=tools.train_tokenizer:main",
            "bluelm-mixture-report=tools.mixture_report:main",
            "bluelm-convert=tools.convert_checkpoint:main",
            "bluelm-generate=tools.generate:main",
            "bluelm-evaluate=tools.evaluate:main",
            "bluelm-plot-metrics=tools.plot_metrics:main",
            "bluelm-fault-check=tools.fault_check:main",
            "bluelm-rl-toy-data=tools.rl_from_sft_toy:main",
            "bluelm-launch=megatron_bluelm.parallel.launch:main",
        ]
    },
)
