"""The package layout, which pyproject.toml cannot state: the repository's top-level configs/ and
slurm/ (their one source) ship inside the package as mtlxray/configs and mtlxray/slurm.

Everything else (metadata, dependencies, the version) is in pyproject.toml.
"""

from setuptools import find_namespace_packages, find_packages, setup

# Each folder under configs/ is listed as a (data-only) package: setuptools warns about folders
# inside a package that no `packages` entry names.
CONFIG_PACKAGES = ["mtlxray.configs", *(f"mtlxray.configs.{name}" for name in find_namespace_packages(where="configs"))]

setup(
    packages=[*find_packages(include=["mtlxray", "mtlxray.*"]), *CONFIG_PACKAGES, "mtlxray.slurm"],
    package_dir={"mtlxray.configs": "configs", "mtlxray.slurm": "slurm"},
    package_data={
        "mtlxray": ["py.typed"],
        **{name: ["*.yaml", "*.json"] for name in CONFIG_PACKAGES},
        "mtlxray.slurm": ["*.sh"],
    },
)
