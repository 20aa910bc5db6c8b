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


# Version ranges: the lowest version each feature is tested with, and an upper bound at the next
# major where a major release has broken this project or its kind of code before (numpy 2, pydicom
# 3, pydantic 2, transformers 5) or announces removals the code relies on. Installs take the newest
# versions these allow, as a user's would; constraints.txt pins the exact versions of the last green
# run for deployments that want them: pip install -c constraints.txt -e ".[test]".

# Extras the test extra also pulls (listed once so the two cannot drift apart).
ONNX = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"]  # export, ONNX Runtime backend, INT8
PLOT = ["matplotlib>=3.8"]  # loss curves, ROC, reliability and benchmark PNGs
SEG = ["highdicom>=0.23,<1"]  # segment --format dicom-seg, SR/SEG/SC writers (radflash.dicomout)
LIBJPEG = ["pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"]  # 12-bit JPEG Extended: opt-in, libjpeg is GPL
NIFTI = ["nibabel>=5"]  # segment --format nifti
RAY = ["ray[data]>=2.40,<3"]  # score/segment --ray: decode tasks and inference actors on Ray Data
DICOMWEB = ["dicomweb-client>=0.59", *SEG]  # dicomweb+http(s):// inputs; --store builds SRs with highdicom
DIMSE = ["pynetdicom>=3.0,<4", *SEG]  # dimse:// inputs (C-FIND, C-GET/C-MOVE) and --store dimse:// (C-STORE)
SERVE = ["prometheus-client>=0.20", "pynetdicom>=3.0,<4", "dicomweb-client>=0.59", *SEG]  # radflash serve
OPENVINO = ["openvino>=2025.2", "nncf>=2.17"]  # --backend openvino, OpenVINO INT8 (NNCF post-training)
TRANSFORMERS = ["transformers>=4.44,<6"]  # bench's reference path; parity tests against its modules

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
    package_data={"radflash": ["VERSION", "assets/**/*"], "radflash.training": ["configs/*.yaml"],
                  "radflash.dicomout": ["codes.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<3",
        "numpy>=1.24,<3",
        "click>=8.1,<9",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pydicom>=3.0,<4",
        # pixel decoders, all permissively licensed: every syntax a CR/DX archive holds decodes on the
        # default install (radflash.io.decoders picks the fastest measured plugin per syntax)
        "pylibjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.3",  # JPEG 2000, HTJ2K
        "pylibjpeg-rle>=2.0",  # RLE
        "python-gdcm>=3.0.10",  # JPEG Lossless (Process 14, SV1), JPEG-LS fallback (BSD)
        "pyjpegls>=1.3",  # JPEG-LS through CharLS (MIT): faster than GDCM here
        "pillow>=10",
        "pyarrow>=15",
        "pyyaml>=6",
        "rich>=13",  # summary tables and progress bars (radflash.util.progress)
        "pydantic>=2,<3",  # config validation
    ],
    # Optional features: each is imported only where it is used, and its absence there is a
    # one-line error naming the extra (radflash.util.optional.require).
    extras_require={
        "onnx": ONNX,
        "plot": PLOT,
        "seg": SEG,
        "triton": ["triton>=3.0"],
        "tensorrt": ["tensorrt>=10"],
        "libjpeg": LIBJPEG,
        "jpegls": LIBJPEG,  # the earlier name of the same extra (JPEG-LS itself is now core)
        "nifti": NIFTI,
        "dicomweb": DICOMWEB,
        "dimse": DIMSE,
        "openvino": OPENVINO,
        "serve": SERVE,  # `radflash serve`: C-STORE/STOW-RS intake, forwarding, Prometheus metrics
        "bench": TRANSFORMERS,  # the reference path that `radflash bench` compares against
        "ray": RAY,  # `score --ray`: decode tasks and inference actors on a Ray cluster
        # Everything the test suite exercises: every extra but tensorrt (NVIDIA GPUs only) and the
        # GPL libjpeg plugin (the decoder tests cover both its presence and its absence, and a
        # permissive test install keeps "no decoder → skipped with a reason" exercised), plus
        # test-only references: scikit-learn for AUROC/AUPRC, psutil for memory checks.
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            *TRANSFORMERS,
            "pydicom-data>=1.0",
            "triton>=3.0",
            *ONNX, *PLOT, *SEG, *NIFTI, *DICOMWEB, *DIMSE, *OPENVINO, *SERVE,
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
