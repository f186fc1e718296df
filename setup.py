from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("pytest", "hypothesis"))]

setup(
    name="fxpress",
    version="0.1.0",
    description="Compress neural networks the way a compiler would: graph IR, rewrite passes, backends.",
    packages=find_packages(include=["fxpress", "fxpress.*"]),
    package_data={"fxpress.zoo": ["fixtures/*"], "fxpress.backends.native": ["*.c"], "fxpress.ops": ["*.c"]},
    python_requires=">=3.10",
    install_requires=requirements,
    entry_points={"console_scripts": ["fxpress=fxpress.cli:main"]},
)
