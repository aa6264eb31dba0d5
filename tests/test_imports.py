"""Every module of the package imports on its own, first, in a fresh interpreter.

An import cycle only shows when the module in the cycle that is not yet loaded
is imported first (``from prsl_kernels.sft import ...`` in a new process), which
a test session that has already imported half the package never sees. One
subprocess imports each module in turn, after dropping every ``prsl_kernels``
and ``reference`` module from ``sys.modules``: each import starts from an
unloaded package, while torch and transformers stay loaded (a new interpreter
per module would cost seconds each).
"""

import pkgutil
import subprocess
import sys
import textwrap

import prsl_kernels

_SCRIPT = textwrap.dedent("""
    import importlib, sys, traceback
    failures = []
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m.split(".")[0] in ("prsl_kernels", "reference")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception:
            failures.append(name + ":\\n" + traceback.format_exc(limit=-3))
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
""")


def package_modules():
    names = ["reference"]
    for info in pkgutil.walk_packages(prsl_kernels.__path__, "prsl_kernels."):
        names.append(info.name)
    return ["prsl_kernels"] + sorted(names)


def test_the_walk_finds_the_modules_users_import():
    names = package_modules()
    for expected in ("prsl_kernels.sft", "prsl_kernels.hf_patch", "prsl_kernels.hf", "prsl_kernels.drivers.models",
                     "prsl_kernels.drivers.chat_models", "prsl_kernels.triton_kernels"):
        assert expected in names


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = package_modules()
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"modules that fail to import on their own:\n{result.stdout}\n{result.stderr[-3000:]}"


def test_the_readme_trl_recipe_imports_in_a_new_process():
    # The exact first line of the README's TRL recipe, in a process of its own.
    result = subprocess.run([sys.executable, "-c", "from prsl_kernels.sft import PRSLSFTTrainer; "
                             "from prsl_kernels.hf_patch import apply_prsl"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
