"""Python modules generated from attnserve's .proto files.

The generated code is never committed: it is produced from the repository's
proto/ with Debian's protoc and grpc_python_plugin, into a build directory
that is put on sys.path. Where it goes, first match wins:

1. $ATTNSERVE_PY_GEN, if set;
2. <repo>/build/gen/python, when this package runs from a checkout;
3. ~/.cache/attnserve_client/gen.

If the modules are already importable (on PYTHONPATH), nothing is generated.
"""

import fcntl
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parents[2]
_ATTENTION_PROTO = "attnserve/v1/attention.proto"
_HEALTH_PROTO = "grpc/health/v1/health.proto"
# The health module is generated under grpc_health/ (as grpcio-health-checking
# names it): a top-level "grpc" directory would be shadowed by the grpc package.
_HEALTH_STAGED = "grpc_health/v1/health.proto"
_PROTOC = "protoc"
_GRPC_PYTHON_PLUGIN = "/usr/bin/grpc_python_plugin"


def proto_dir():
    """The directory holding attnserve/v1/attention.proto."""
    env = os.environ.get("ATTNSERVE_PROTO_DIR")
    path = pathlib.Path(env) if env else _REPO_ROOT / "proto"
    if not (path / _ATTENTION_PROTO).is_file():
        raise FileNotFoundError(
            f"attnserve protos not found under {path}; set ATTNSERVE_PROTO_DIR to the "
            "repository's proto/ directory")
    return path


def default_gen_dir():
    env = os.environ.get("ATTNSERVE_PY_GEN")
    if env:
        return pathlib.Path(env)
    if (_REPO_ROOT / "proto" / _ATTENTION_PROTO).is_file():
        return _REPO_ROOT / "build" / "gen" / "python"
    return pathlib.Path.home() / ".cache" / "attnserve_client" / "gen"


def _up_to_date(gen_dir, protos):
    outputs = [gen_dir / "attnserve/v1/attention_pb2_grpc.py",
               gen_dir / "grpc_health/v1/health_pb2_grpc.py"]
    if not all(p.is_file() for p in outputs):
        return False
    newest_input = max(p.stat().st_mtime for p in protos)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


def generate(gen_dir=None, protos_root=None):
    """Generates the Python modules into gen_dir (created); returns gen_dir.

    Regenerates only when the outputs are missing or older than the protos.
    Raises subprocess.CalledProcessError with protoc's message on failure.
    """
    gen_dir = pathlib.Path(gen_dir) if gen_dir else default_gen_dir()
    root = pathlib.Path(protos_root) if protos_root else proto_dir()
    protos = [root / _ATTENTION_PROTO, root / _HEALTH_PROTO]
    if _up_to_date(gen_dir, protos):
        return gen_dir
    gen_dir.parent.mkdir(parents=True, exist_ok=True)
    # One generator at a time (parallel tests start together): the others wait,
    # then find the modules up to date.
    with open(gen_dir.parent / f".{gen_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _up_to_date(gen_dir, protos):
            _generate_locked(gen_dir, root, protos)
    return gen_dir


def _generate_locked(gen_dir, root, protos):
    # Generate into a scratch directory and move into place, so processes
    # importing the modules meanwhile never see half-written ones.
    with tempfile.TemporaryDirectory(dir=gen_dir.parent) as scratch:
        scratch = pathlib.Path(scratch)
        staged = scratch / "proto"
        out = scratch / "out"
        (staged / _ATTENTION_PROTO).parent.mkdir(parents=True)
        (staged / _HEALTH_STAGED).parent.mkdir(parents=True)
        out.mkdir()
        shutil.copy(root / _ATTENTION_PROTO, staged / _ATTENTION_PROTO)
        shutil.copy(root / _HEALTH_PROTO, staged / _HEALTH_STAGED)
        subprocess.run(
            [_PROTOC, f"--proto_path={staged}", f"--python_out={out}",
             f"--grpc_python_out={out}",
             f"--plugin=protoc-gen-grpc_python={_GRPC_PYTHON_PLUGIN}",
             _ATTENTION_PROTO, _HEALTH_STAGED],
            check=True, capture_output=True, text=True)
        gen_dir.mkdir(parents=True, exist_ok=True)
        for package in ("attnserve", "grpc_health"):
            target = gen_dir / package
            old = scratch / f"old_{package}"
            if target.exists():
                target.rename(old)
            (out / package).rename(target)


def load():
    """Imports the generated modules, generating them first if needed.

    Returns (attention_pb2, attention_pb2_grpc, health_pb2, health_pb2_grpc).
    """
    names = ("attnserve.v1.attention_pb2", "attnserve.v1.attention_pb2_grpc",
             "grpc_health.v1.health_pb2", "grpc_health.v1.health_pb2_grpc")
    try:
        return tuple(importlib.import_module(n) for n in names)
    except ImportError:
        pass
    gen_dir = str(generate())
    if gen_dir not in sys.path:
        sys.path.insert(0, gen_dir)
    importlib.invalidate_caches()
    return tuple(importlib.import_module(n) for n in names)


if __name__ == "__main__":
    # python3 -m attnserve_client._stubs [GEN_DIR]: generate and print where.
    print(generate(sys.argv[1] if len(sys.argv) > 1 else None))
