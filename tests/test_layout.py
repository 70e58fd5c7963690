"""The package's shape: no import circles, no intra-package imports hidden in functions, no process-wide settings
made by library modules, and the top-level kernels/ folder never taking the import name of another library."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mgrpo"
# Intra-package imports inside a function, each for a reason other than dodging a circle:
DEFERRED = {("mgrpo.build", "mgrpo.engines.vllm"),          # imports vLLM, an optional dependency: only when wanted
            ("mgrpo.data.tiny", "mgrpo.config")}            # `python -m mgrpo.data.tiny --ship`, the script entry


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, level: int, name: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = module.split(".")[: len(module.split(".")) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def imports(path: Path) -> tuple:
    """(module, [(imported mgrpo module, at top level?)]) of one file."""
    module, tree = module_name(path), ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    top = set(id(node) for node in tree.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, node.level, node.module or "", is_package)
            for alias in node.names:       # `from . import x` may import a submodule x
                candidate = f"{target}.{alias.name}"
                found.append((candidate if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists()
                              or (ROOT / Path(*candidate.split("."))).is_dir() else target, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
    return module, [(m, t) for m, t in found if m == "mgrpo" or m.startswith("mgrpo.")]


def graph() -> dict:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        module, found = imports(path)
        edges[module] = found
    return edges


def test_no_import_circles():
    edges = {m: {t for t, top in found if top and t != m} for m, found in graph().items()}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == "open":
                cycle.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycle, f"import circles: {cycle}"


def test_no_intra_package_import_hidden_in_a_function():
    hidden = {(m, t) for m, found in graph().items() for t, top in found if not top and t != m}
    assert hidden <= DEFERRED, f"imports inside functions: {sorted(hidden - DEFERRED)}"


def test_library_modules_set_no_process_wide_settings():
    """Environment variables other libraries read are set by mgrpo.environment, called by the entry point."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "environment.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Assign, ast.Call)) else ""
            if ("os.environ.setdefault" in text or text.startswith("os.environ[")) and "env.pop" not in text:
                offenders.append(f"{path.relative_to(ROOT)}: {text[:80]}")
    assert not offenders, offenders


def run_from_root(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_kernels_folder_does_not_shadow_the_kernels_distribution(tmp_path):
    """From the repository root (where the tests, the benchmarks and a user's scripts run), `import kernels` finds an
    installed `kernels` distribution (Hugging Face's hub kernels, which transformers and bitsandbytes import), not
    our folder of Triton kernels: it has no __init__.py, so it is not a regular package that wins the search.
    Stood in for by a package of that name on the path, as an installed one would be."""
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("def get_kernel(*a, **k):\n    raise RuntimeError('offline')\n")
    found = run_from_root("import kernels; print(kernels.__file__)", extra_path=str(tmp_path / "site"))
    assert found.returncode == 0 and found.stdout.strip() == str(installed / "__init__.py"), found.stderr
    imported = run_from_root("import bitsandbytes", extra_path=str(tmp_path / "site"))
    assert imported.returncode == 0, imported.stderr
    assert str(ROOT / "kernels") not in imported.stderr and "cannot import name 'get_kernel'" not in imported.stderr
    # and without one installed, bitsandbytes never loads ours either (what it says then is its own complaint)
    plain = run_from_root("import bitsandbytes")
    assert plain.returncode == 0 and str(ROOT / "kernels") not in plain.stderr


FRAGMENTS = """
import sys, torch
if sys.argv[1] == "configured":
    from mgrpo.environment import return_large_blocks_to_the_system
    assert return_large_blocks_to_the_system()
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
freed = torch.ones(1 << 20); del freed          # a 4 MiB block freed: glibc's threshold rises past it
before = resident_mib()
large, small = [], []
for _ in range(100):
    large.append(torch.ones(1 << 19))           # 2 MiB activations ...
    small.append(torch.ones(256))               # ... with 1 KiB tensors alive between them
del large
print(round(resident_mib() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_go_back_to_the_system():
    """What `mgrpo train` does for a real model, glibc's mmap threshold fixed: 200 MiB of freed 2 MiB tensors
    interleaved with live small ones stay resident by default and are returned once it is (mgrpo/environment.py)."""
    def kept(mode):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        out = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, env=env,
                             check=True).stdout
        return int(out.split()[-1])
    assert kept("default") > 150          # the fragmentation this guards against, on this machine's glibc
    assert kept("configured") < 20
