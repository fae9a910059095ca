"""Install the ``tbd`` package (Task-Balanced Distillation for Detectron2).

Detectron2 itself is not on PyPI under its own name; install it first (scripts/setup.sh does,
or build the official source). It is therefore not listed in install_requires.
"""

from setuptools import find_packages, setup

setup(
    name="tbd-detectron2",
    version="0.1.0",
    description="Task-Balanced Distillation (TBD) for Detectron2 RetinaNet students",
    # The library, and the project's benchmarks and tools as importable packages (their scripts
    # import each other, and the tests import them, without sys.path edits).
    packages=find_packages(include=["tbd", "tbd.*"]) + ["tbd_benchmarks", "tbd_tools"],
    package_dir={"tbd_benchmarks": "projects/TBD/benchmarks", "tbd_tools": "projects/TBD/tools"},
    python_requires=">=3.9",
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "opencv-python-headless",
                      "tqdm"],
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"]},
)
