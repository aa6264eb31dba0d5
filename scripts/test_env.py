"""The locked test environment (constraints/test.txt), for scripts/setup.sh and ``make lock``.

    python scripts/test_env.py check           exit 0 when this checkout is installed (editable, with
                                               pyproject's current requirements) and every package of
                                               the lock (and of constraints/no-deps.txt) is at its locked
                                               version: setup.sh then skips pip
    python scripts/test_env.py constraints     the constraints pip installs with: the lock, plus the
                                               installed torch held at its version (a CPU or CUDA build,
                                               never replaced) and whatever that torch pins exactly
                                               (a CUDA torch pins its triton) at torch's pin
    python scripts/test_env.py constraints --unlocked
                                               only the held torch (PRSL_UNLOCKED=1: newest releases)
    python scripts/test_env.py no-deps [--unlocked]
                                               the requirements setup.sh installs with ``pip --no-deps``
                                               (constraints/no-deps.txt; unlocked: names only)
    python scripts/test_env.py forbidden       exit 1, saying why, when a package the test environment
                                               must not hold is installed (torchvision)
    python scripts/test_env.py freeze          a new lock from what is installed: every package that
                                               ``prsl-kernels[test]`` needs, except torch and the
                                               packages only torch needs (they come with the torch
                                               that is there)

Standard library only, except ``packaging`` (pip's own copy where it is not installed).
"""

import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a fresh machine: pip carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "test.txt"
NO_DEPS = ROOT / "constraints" / "no-deps.txt"  # installed with pip --no-deps; not rewritten by freeze
PROJECT = "prsl-kernels"
HELD = "torch"  # never pinned by the lock, never replaced


def _pyproject():
    import tomllib  # Python >= 3.11; on 3.10 check fails and setup.sh runs pip, which is always right

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _declared_requirements():
    """pyproject's requirements as the installed metadata states them: extras as markers."""
    project = _pyproject()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, items in project.get("optional-dependencies", {}).items():
        for item in items:
            req = Requirement(item)
            req.marker = Requirement(f"x; extra == '{extra}'").marker
            reqs.append(req)
    return reqs


def _key(req):
    return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)), str(req.marker or "")


def _lock_pins(path=LOCK):
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


# Packages the test environment must not hold, and why (setup.sh stops on them).
FORBIDDEN = {
    "torchvision": "a torchvision wheel pins one torch build: installing or upgrading it replaces the installed "
                   "torch (on this project's machines the CPU build, with a multi-GB CUDA one), and the drivers' "
                   "processors are tested on their torchvision-free path",
}


def _installed_version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


TOP_LEVEL_PACKAGES = ("prsl_kernels", "reference")


def _installed_from_root(package):
    """Whether the install (not the working directory, which python puts first on the path)
    resolves ``package`` to this checkout: an install made before a package was added or
    renamed resolves it elsewhere, or not at all."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != ROOT]
    try:
        spec = importlib.util.find_spec(package)
    finally:
        sys.path[:] = saved
    return spec is not None and bool(spec.origin) and Path(spec.origin).resolve().is_relative_to(ROOT)


def problems(lock=LOCK, no_deps=NO_DEPS):
    """What differs between this environment and the lock (empty: nothing to install)."""
    found = []
    for package in TOP_LEVEL_PACKAGES:
        if not _installed_from_root(package):
            found.append(f"{package} is not installed from {ROOT}")
    try:
        installed = {_key(Requirement(r)) for r in md.distribution(PROJECT).requires or []}
    except md.PackageNotFoundError:
        installed = set()
    if installed != {_key(r) for r in _declared_requirements()}:
        found.append(f"the installed {PROJECT} metadata is not pyproject.toml's")
    for name, version in {**_lock_pins(lock), **_lock_pins(no_deps)}.items():
        have = _installed_version(name)
        if have != version:
            found.append(f"{name} {have or 'missing'} (locked: {version})")
    return found


def forbidden():
    """Messages for the installed packages of FORBIDDEN (empty: none is installed)."""
    return [f"{name} {have} is installed, and the test environment must not hold it: {why}. Uninstall it "
            f"(pip uninstall {name}) or use a fresh virtual environment."
            for name, why in FORBIDDEN.items() if (have := _installed_version(name))]


def no_deps(unlocked=False, path=NO_DEPS):
    pins = _lock_pins(path)
    return "".join(f"{name}\n" if unlocked else f"{name}=={version}\n" for name, version in pins.items())


def _torch_pins():
    """``{name: version}`` that the installed torch requires exactly, on this platform."""
    pins = {}
    for line in md.distribution(HELD).requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[canonicalize_name(req.name)] = exact[0]
    return pins


def constraints(unlocked=False, lock=LOCK):
    held = {canonicalize_name(HELD): md.version(HELD), **_torch_pins()}
    lines = [f"{name}=={version}  # held: the installed torch" for name, version in held.items()]
    if not unlocked:
        lines += [f"{name}=={version}" for name, version in _lock_pins(lock).items() if name not in held]
    return "\n".join(lines) + "\n"


def _closure():
    """Installed ``{name: version}`` of everything prsl-kernels[test] needs, torch left out (with the
    packages only torch needs: they are not walked unless another package needs them too)."""
    project = _pyproject()
    extras = {"test"}
    todo = [Requirement(r) for r in project.get("optional-dependencies", {})["test"]]
    todo += [Requirement(r) for r in project["dependencies"]]
    found, walked = {}, set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == canonicalize_name(PROJECT):  # the project's own extras
            for extra in req.extras - extras:
                extras.add(extra)
                todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
            continue
        if name == canonicalize_name(HELD) or (name, frozenset(req.extras)) in walked:
            continue
        walked.add((name, frozenset(req.extras)))
        dist = md.distribution(req.name)
        found[name] = dist.version
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return found


def freeze():
    header = ("# The test environment CI runs: prsl-kernels[test] resolved, at these versions (pip -c,\n"
              "# scripts/setup.sh). torch and what only torch needs are left out: the installed torch\n"
              "# (CPU or CUDA build) is kept. Regenerate after an upgrade: make lock.\n")
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(_closure().items()))


def main(argv):
    command = argv[0] if argv else "check"
    if command == "check":
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    if command == "constraints":
        sys.stdout.write(constraints(unlocked="--unlocked" in argv[1:]))
        return 0
    if command == "no-deps":
        sys.stdout.write(no_deps(unlocked="--unlocked" in argv[1:]))
        return 0
    if command == "forbidden":
        found = forbidden()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    if command == "freeze":
        sys.stdout.write(freeze())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
