"""Only what pyproject.toml cannot say: the package built from a git checkout records its commit
(racebench/build_commit.txt), so run.json names it for a non-editable install too."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCommit(build_py):
    def run(self):
        super().run()
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return  # not a checkout (an sdist): run.json then has no commit
        target = Path(self.build_lib) / "racebench" / "build_commit.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(sha + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
