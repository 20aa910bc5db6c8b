from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = (ROOT / "engine" / "VERSION").read_text().strip()

# Folder → import name: engine/ IS the package `radflash`; kernels/, training/ and calibration/
# become its subpackages radflash.kernels, radflash.training and radflash.calibration.
PACKAGE_DIR = {
    "radflash": "engine",
    "radflash.kernels": "kernels",
    "radflash.training": "training",
    "radflash.calibration": "calibration",
}


def _subpackages(root: str, folder: str) -> list[str]:
    base = ROOT / folder
    names = [root]
    for init in sorted(base.rglob("__init__.py")):
        rel = init.parent.relative_to(base)
        if rel.parts:
            names.append(".".join((root, *rel.parts)))
    return names


# Extras the test extra also pulls (listed once so the two cannot drift apart).
ONNX = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"]  # export, ONNX Runtime backend, INT8
PLOT = ["matplotlib>=3.8"]  # loss curves, ROC, reliability and benchmark PNGs
SEG = ["highdicom>=0.23"]  # segment --format dicom-seg
JPEGLS = ["pyjpegls>=1.3", "pylibjpeg-libjpeg>=2.1"]  # JPEG-LS / JPEG lossless: opt-in, libjpeg is GPL
NIFTI = ["nibabel>=5"]  # segment --format nifti
RAY = ["ray[data]>=2.40"]  # score/segment --ray: decode tasks and inference actors on Ray Data
DICOMWEB = ["dicomweb-client>=0.59", *SEG]  # dicomweb+http(s):// inputs; --store builds SRs with highdicom

packages: list[str] = []
for name, folder in PACKAGE_DIR.items():
    packages += _subpackages(name, folder)

setup(
    name="radflash",
    version=VERSION,
    description="Fast inference engine for zero-shot chest X-ray vision-language models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=PACKAGE_DIR,
    package_data={"radflash": ["VERSION", "assets/**/*"], "radflash.training": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "click>=8.1",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pydicom>=3.0",
        "pylibjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-rle>=2.0",
        "pillow>=10",
        "pyarrow>=15",
        "pyyaml>=6",
        "rich>=13",  # summary tables and progress bars (radflash.util.progress)
        "pydantic>=2",  # config validation
    ],
    # Optional features: each is imported only where it is used, and its absence there is a
    # one-line error naming the extra (radflash.util.optional.require).
    extras_require={
        "onnx": ONNX,
        "plot": PLOT,
        "seg": SEG,
        "triton": ["triton>=3.0"],
        "tensorrt": ["tensorrt>=10"],
        "jpegls": JPEGLS,
        "nifti": NIFTI,
        "dicomweb": DICOMWEB,
        "bench": ["transformers>=4.44"],  # the reference path that `radflash bench` compares against
        "ray": RAY,  # `score --ray`: decode tasks and inference actors on a Ray cluster
        # Everything the test suite exercises: every extra but tensorrt (NVIDIA GPUs only) and the
        # GPL libjpeg plugin (the decoder tests cover both its presence and its absence, and a
        # permissive test install keeps "no decoder → skipped with a reason" exercised), plus
        # test-only references: scikit-learn for AUROC/AUPRC, psutil for memory checks.
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "transformers>=4.44",
            "pydicom-data>=1.0",
            "triton>=3.0",
            *ONNX, *PLOT, *SEG, *NIFTI, *DICOMWEB,
            "pyjpegls>=1.3",
            "scipy>=1.11",
            "scikit-learn>=1.3",
            "psutil>=5.9",
            "ruff>=0.6",
            "selenium>=4.10",  # report.html in headless Chromium (the browser itself: apt, see .ci/run)
            *RAY,
        ],
    },
    entry_points={"console_scripts": ["radflash=radflash.cli:main"]},
)
