"""The build step of attnserve_client: gRPC stubs compiled into the package.

pyproject.toml holds the metadata; this file adds two commands to
setuptools':
- build_py also compiles proto/attnserve/v1/attention.proto and
  proto/grpc/health/v1/health.proto with protoc and grpc_python_plugin into
  attnserve_client/_generated of the build tree, so the installed package
  imports its stubs and never runs protoc;
- sdist also copies those protos into the archive's proto/, so a build from
  the sdist finds them.

The protos are looked for in $ATTNSERVE_PROTO_DIR, then proto/ beside this
file (an sdist), then the repository's proto/ two levels up (pip install
client/python from a checkout).
"""

import importlib.util
import os
import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent


def _load_stubs_module():
    # By its path: importing the package would import grpc and NumPy, which
    # the build does not need.
    spec = importlib.util.spec_from_file_location(
        "attnserve_client_build_stubs", HERE / "attnserve_client" / "_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stubs = _load_stubs_module()


def find_proto_dir():
    env = os.environ.get("ATTNSERVE_PROTO_DIR")
    candidates = [pathlib.Path(env)] if env else [HERE / "proto", HERE.parent.parent / "proto"]
    for candidate in candidates:
        if all((candidate / rel).is_file() for rel in stubs.PROTOS):
            return candidate
    raise FileNotFoundError(
        f"attnserve_client's build needs {' and '.join(stubs.PROTOS)}, found under none of "
        f"{', '.join(str(c) for c in candidates)}: build from the repository "
        "(pip install client/python), from an sdist made there, or set ATTNSERVE_PROTO_DIR "
        "to the repository's proto/ directory")


class BuildPyWithStubs(build_py):
    """build_py, then the stubs into <build_lib>/attnserve_client/_generated."""

    def _generated_dir(self):
        return pathlib.Path(self.build_lib) / "attnserve_client" / "_generated"

    def run(self):
        super().run()
        if not self.dry_run:
            stubs.compile_protos(find_proto_dir(), self._generated_dir())

    def get_outputs(self, include_bytecode=1):
        generated = [str(self._generated_dir() / f"{m}.py") for m in ("__init__", *stubs.MODULES)]
        return super().get_outputs(include_bytecode) + generated


class SdistWithProtos(sdist):
    """sdist, with the protos in the archive's proto/."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        root = find_proto_dir()
        for rel in stubs.PROTOS:
            target = pathlib.Path(base_dir) / "proto" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, target)


# packages here rather than in pyproject.toml, whose [tool.setuptools] table
# setuptools 66 still calls beta.
setup(packages=["attnserve_client"],
      cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
