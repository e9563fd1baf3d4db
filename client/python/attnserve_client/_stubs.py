"""Python modules generated from attnserve's .proto files.

An installed attnserve_client carries them in attnserve_client._generated:
the package's build step (setup.py) runs compile_protos() on the repository's
protos with Debian's protoc and grpc_python_plugin, so an installed package
never runs protoc. The generated code is never committed.

Run from a checkout without installing (PYTHONPATH=client/python, as the
bench/ scripts do), the package has no _generated modules and compiles them
on first import into a directory put on sys.path; first match wins:

1. $ATTNSERVE_PY_GEN, if set;
2. <repo>/build/gen/python;
3. ~/.cache/attnserve_client/gen.

This file uses the standard library only: setup.py loads it by its path.
"""

import fcntl
import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parents[2]
ATTENTION_PROTO = "attnserve/v1/attention.proto"
HEALTH_PROTO = "grpc/health/v1/health.proto"
PROTOS = (ATTENTION_PROTO, HEALTH_PROTO)
# The health proto is compiled as grpc_health/v1/health.proto, the name
# grpcio-health-checking gives it: the descriptor pool then sees one file, not
# two defining grpc.health.v1 messages, when a program imports both.
_HEALTH_STAGED = "grpc_health/v1/health.proto"
_DEFAULT_GRPC_PYTHON_PLUGIN = "/usr/bin/grpc_python_plugin"
# The modules of the generated package, in load()'s order.
MODULES = ("attention_pb2", "attention_pb2_grpc", "health_pb2", "health_pb2_grpc")
# Where load() puts the modules it compiles itself, on sys.path.
_CHECKOUT_PACKAGE = "attnserve_client_checkout_stubs"


def proto_dir():
    """The directory holding attnserve/v1/attention.proto in a checkout (or
    $ATTNSERVE_PROTO_DIR)."""
    env = os.environ.get("ATTNSERVE_PROTO_DIR")
    path = pathlib.Path(env) if env else _REPO_ROOT / "proto"
    if not (path / ATTENTION_PROTO).is_file():
        raise FileNotFoundError(
            f"attnserve protos not found under {path}; set ATTNSERVE_PROTO_DIR to the "
            "repository's proto/ directory")
    return path


def _tool(env, default, what):
    name = os.environ.get(env) or default
    path = shutil.which(name) if name else None
    if path is None:
        raise FileNotFoundError(
            f"{what} not found ({name or 'not on PATH'}): install Debian's protobuf-compiler "
            f"and protobuf-compiler-grpc, or set {env}")
    return path


def compile_protos(protos_root, package_dir):
    """Compiles attention.proto and health.proto under protos_root into the
    Python package package_dir (replaced if it exists): the modules MODULES
    and an __init__.py. The stubs import their messages relatively (from .
    import attention_pb2), so the package works wherever it is put.

    protoc is $PROTOC or the one on PATH; the plugin $GRPC_PYTHON_PLUGIN or
    /usr/bin/grpc_python_plugin. Raises FileNotFoundError for a missing
    proto or tool, RuntimeError with protoc's message when it fails.
    """
    root = pathlib.Path(protos_root)
    package_dir = pathlib.Path(package_dir)
    for rel in PROTOS:
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{root / rel} not found")
    protoc = _tool("PROTOC", "protoc", "protoc")
    plugin = _tool("GRPC_PYTHON_PLUGIN", _DEFAULT_GRPC_PYTHON_PLUGIN, "grpc_python_plugin")
    package_dir.parent.mkdir(parents=True, exist_ok=True)
    # Compile into a scratch directory and move into place, so processes
    # importing the modules meanwhile never see half-written ones.
    with tempfile.TemporaryDirectory(dir=package_dir.parent) as scratch:
        scratch = pathlib.Path(scratch)
        staged, out, package = scratch / "proto", scratch / "out", scratch / "package"
        for src, dst in ((ATTENTION_PROTO, ATTENTION_PROTO), (HEALTH_PROTO, _HEALTH_STAGED)):
            (staged / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / src, staged / dst)
        out.mkdir()
        package.mkdir()
        done = subprocess.run(
            [protoc, f"--proto_path={staged}", f"--python_out={out}", f"--grpc_python_out={out}",
             f"--plugin=protoc-gen-grpc_python={plugin}", ATTENTION_PROTO, _HEALTH_STAGED],
            capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")
        for rel_dir in ("attnserve/v1", "grpc_health/v1"):
            for module in sorted((out / rel_dir).glob("*.py")):
                (package / module.name).write_text(_relative_imports(module.read_text(), module))
        missing = [m for m in MODULES if not (package / f"{m}.py").is_file()]
        if missing:
            raise RuntimeError(f"protoc wrote no {', '.join(missing)}")
        (package / "__init__.py").write_text(
            '"""gRPC stubs generated from attnserve\'s protos by the package\'s build."""\n')
        old = scratch / "old"
        if package_dir.exists():
            package_dir.rename(old)
        package.rename(package_dir)
    return package_dir


def _relative_imports(source, path):
    """protoc writes `from attnserve.v1 import attention_pb2 as ...`; the
    package holds both modules side by side, so the import becomes relative."""
    source = re.sub(r"^from (attnserve|grpc_health)\.v1 import ", "from . import ", source,
                    flags=re.MULTILINE)
    if re.search(r"^\s*(from|import) (attnserve|grpc_health)\b", source, flags=re.MULTILINE):
        raise RuntimeError(f"{path.name}: an import of a generated module is left absolute")
    return source


def default_gen_dir():
    env = os.environ.get("ATTNSERVE_PY_GEN")
    if env:
        return pathlib.Path(env)
    if (_REPO_ROOT / "proto" / ATTENTION_PROTO).is_file():
        return _REPO_ROOT / "build" / "gen" / "python"
    return pathlib.Path.home() / ".cache" / "attnserve_client" / "gen"


def _up_to_date(package_dir, protos):
    outputs = [package_dir / f"{m}.py" for m in MODULES]
    if not all(p.is_file() for p in outputs):
        return False
    newest_input = max(p.stat().st_mtime for p in [*protos, pathlib.Path(__file__)])
    return min(p.stat().st_mtime for p in outputs) >= newest_input


def generate(gen_dir=None, protos_root=None):
    """For a checkout: compiles the modules into gen_dir (created) as the
    package attnserve_client_checkout_stubs; returns gen_dir.

    Compiles only when the modules are missing or older than the protos.
    """
    gen_dir = pathlib.Path(gen_dir) if gen_dir else default_gen_dir()
    root = pathlib.Path(protos_root) if protos_root else proto_dir()
    package_dir = gen_dir / _CHECKOUT_PACKAGE
    protos = [root / rel for rel in PROTOS]
    if _up_to_date(package_dir, protos):
        return gen_dir
    gen_dir.mkdir(parents=True, exist_ok=True)
    # One compiler at a time (parallel tests start together): the others wait,
    # then find the modules up to date.
    with open(gen_dir / f".{_CHECKOUT_PACKAGE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _up_to_date(package_dir, protos):
            compile_protos(root, package_dir)
    return gen_dir


def load():
    """The generated modules (attention_pb2, attention_pb2_grpc, health_pb2,
    health_pb2_grpc): the package's own when it was installed, else (a
    checkout) compiled first if needed. ImportError when neither is there."""
    built_in = f"{__package__}._generated"
    if importlib.util.find_spec(built_in) is not None:
        return tuple(importlib.import_module(f"{built_in}.{m}") for m in MODULES)
    try:
        gen_dir = str(generate())
    except FileNotFoundError as e:
        raise ImportError(
            "attnserve_client has no generated gRPC stubs: install it with "
            f"`pip install client/python` from the repository ({e})") from e
    if gen_dir not in sys.path:
        sys.path.insert(0, gen_dir)
    importlib.invalidate_caches()
    return tuple(importlib.import_module(f"{_CHECKOUT_PACKAGE}.{m}") for m in MODULES)


if __name__ == "__main__":
    # python3 -m attnserve_client._stubs [GEN_DIR]: compile for a checkout and print where.
    print(generate(sys.argv[1] if len(sys.argv) > 1 else None))
