"""Package layout for kvtune.

``strategies/``, ``kernels/`` and ``profiles/`` are top-level folders in the repository but install under the
``kvtune`` namespace (bare packages named ``strategies`` or ``kernels`` would collide with other distributions).
Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = {"kvtune": "kvtune", "kvtune.strategies": "strategies", "kvtune.kernels": "kernels", "kvtune.profiles": "profiles"}


def _packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages(), package_dir=ROOTS)
