"""The package as a user gets it: one version string, ``grkernels --version`` / ``info``, the demo's needs, and the
built artifacts (``python -m build`` makes an sdist carrying examples/ and docs/ and a wheel from it) installed into
a fresh venv that sees only the wheel's declared dependencies, run from outside the source tree.

The fresh venv is made without downloads: the declared dependencies' closure (torch, numpy, tqdm and what they
require, resolved from this environment's metadata) is symlinked into one folder that a ``.pth`` file puts on the
fresh venv's ``sys.path``; nothing else of this environment (no transformers, triton, matplotlib, no editable
grkernels) is visible there. About a minute, most of it compiling ``grkernels._C`` into the wheel.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import grkernels
from grkernels import about, cli

ROOT = Path(__file__).resolve().parents[1]
VERSION_RE = re.compile(r'^__version__ = "([^"]+)"$', re.M)


# ---------------------------------------------------------------- one version string
def test_one_version_string():
    text = (ROOT / "grkernels" / "_version.py").read_text()
    (version,) = VERSION_RE.findall(text)
    assert grkernels.__version__ == version == "0.2.0"
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "grkernels._version.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text().replace(" ", "")
    # no other module spells a version of its own
    for path in (ROOT / "grkernels").rglob("*.py"):
        if path.name != "_version.py":
            assert not VERSION_RE.search(path.read_text()), path


def test_version_flag(capsys):
    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"grkernels {grkernels.__version__} (torch {torch.__version__}, python ")
    assert "--version" in _top_level_help(capsys)


def _top_level_help(capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main(["-h"])
    return capsys.readouterr().out


# ---------------------------------------------------------------- grkernels info
def _expected_version(dists: tuple[str, ...]) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.distribution(d).metadata["Version"]
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def test_package_versions_match_the_installed_metadata():
    got = about.package_versions()
    names = [n for n, _, _ in about.HOST_PACKAGES]
    assert list(got) == names
    assert {"torch", "triton", "transformers", "trl", "accelerate", "lightning", "deepspeed", "verl", "peft",
            "liger_kernel"} == set(names)
    assert got["torch"] == torch.__version__
    for name, module, dists in about.HOST_PACKAGES[1:]:
        exp = _expected_version(dists)
        if exp is None and importlib.util.find_spec(module) is not None:
            exp = "unknown (no metadata)"
        assert got[name] == exp, name


def test_package_versions_missing_and_metadata_less(monkeypatch):
    real_version, real_find = importlib.metadata.version, importlib.util.find_spec

    def version(name):
        if name in ("trl", "peft"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    def find_spec(name, *a):
        return None if name == "trl" else real_find(name, *a)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    got = about.package_versions()
    assert got["trl"] is None  # neither metadata nor module
    if real_find("peft") is not None:  # a module without metadata (a checkout on sys.path)
        assert got["peft"] == "unknown (no metadata)"
    text = about.format_about({**about.about(), "packages": got})
    assert re.search(r"^  trl +not installed$", text, re.M)


def test_info_command_text_and_json(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"grkernels {grkernels.__version__}  (")
    for name, version in about.package_versions().items():
        assert re.search(rf"^  {name} +{re.escape(version or 'not installed')}$", text, re.M), name
    for op in grkernels.info():  # the backend table of the library, every row
        assert f"  {op} " in text
    assert cli.main(["info", "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["grkernels"] == grkernels.__version__
    assert data["packages"] == about.package_versions()
    assert data["backends"] == grkernels.info("cpu")
    assert Path(data["location"]) == Path(grkernels.__file__).parent


def test_info_bad_device_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["info", "--device", "blah"])
    assert stop.value.code == 2 and "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- the demo's needs
def test_demo_without_matplotlib_says_so_before_it_starts(monkeypatch, capsys):
    import importlib.util

    import grkernels.demo.cli as demo_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    ran = []
    monkeypatch.setattr(demo_cli, "main", lambda argv: ran.append(argv) or 0)
    assert cli.main(["demo", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "grkernels[demo]" in err and "--no-plot" in err
    assert ran == []  # nothing started
    for flags in (["--quick", "--no-plot"], ["--help"]):
        assert cli.main(["demo", *flags]) == 0
    assert ran == [["--quick", "--no-plot"], ["--help"]]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert cli.main(["demo", "--quick"]) == 0 and ran[-1] == ["--quick"]


def _third_party_imports(path: Path) -> dict[str, bool]:
    """Top-level names of non-stdlib, non-grkernels imports in a file -> imported at module level?"""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for n in names:
            root = n.split(".")[0]
            if root in sys.stdlib_module_names or root == "grkernels":
                continue
            out[root] = out.get(root, False) or id(node) in top
    return out


def test_the_demo_imports_only_declared_dependencies():
    """Every third-party import of the demo and the command line is a dependency of the package, or matplotlib
    (the [demo] extra), imported only inside the plotting functions: what the wheel-venv test runs, statically."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name for r in project["dependencies"]}
    assert "matplotlib" in {Requirement(r).name for r in project["optional-dependencies"]["demo"]}
    assert "tqdm" in declared
    files = [*sorted((ROOT / "grkernels" / "demo").glob("*.py"))]
    files += [ROOT / "grkernels" / f for f in ("cli.py", "about.py", "argtypes.py", "quickstart.py", "__main__.py")]
    for f in files:
        for name, module_level in _third_party_imports(f).items():
            if name == "matplotlib":
                assert not module_level, f
            else:
                assert name in declared, (f.name, name)


# ---------------------------------------------------------------- the built artifacts in a fresh venv
def _source_copy(dst: Path) -> Path:
    """The working tree's files (tracked and untracked-but-not-ignored) copied to ``dst``: the build writes its
    egg-info and build/ folders there, not into the checkout other processes use."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                                capture_output=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "*.so",
                                                                 "__pycache__", "demo_out", "sweep_all"))
        return dst
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _requirement_closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` need, recursively (markers evaluated, extras off)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        dist = importlib.metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), (str(req), dist.version)
        seen[key] = dist
        todo += [r for r in (dist.requires or [])]
    return list(seen.values())


def _link_distributions(dists, folder: Path) -> None:
    """Symlink each distribution's top-level entries (packages, modules, .libs, dist-info) into ``folder``."""
    folder.mkdir(exist_ok=True)
    for dist in dists:
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
        if getattr(dist, "_path", None) is not None:  # the dist-info folder, also when RECORD is missing
            tops.add(Path(dist._path).name)
        for top in tops:
            if top.endswith(".pth") or top == "__pycache__" or (folder / top).exists():
                continue
            if (site / top).exists():
                (folder / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist + wheel by ``python -m build --no-isolation`` from a copy of the working tree."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("GRKERNELS_NO_EXT", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (sdist,) = out.glob("grkernels-*.tar.gz")
    (wheel,) = out.glob("grkernels-*.whl")
    return {"tmp": tmp, "sdist": sdist, "wheel": wheel}


def test_sdist_carries_examples_docs_and_sources(built):
    with tarfile.open(built["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert built["sdist"].name == f"grkernels-{grkernels.__version__}.tar.gz"
    tracked = subprocess.run(["git", "ls-files", "examples", "docs", "csrc"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert tracked, "examples/, docs/ and csrc/ are tracked"
    missing = sorted(set(tracked) - names)
    assert not missing, missing
    for f in ("README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "setup.py", "grkernels/demo/README.md"):
        assert f in names, f
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_wheel_metadata(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        entry = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert f"\nVersion: {grkernels.__version__}\n" in meta
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    core = sorted(r for r in requires if "extra ==" not in r)
    assert core == ["numpy", "torch>=2.4", "tqdm"], core
    assert any(r.startswith("matplotlib") and 'extra == "demo"' in r for r in requires)
    assert "grkernels = grkernels.cli:main" in entry
    assert any(re.fullmatch(r"grkernels/_C\..*\.so", n) for n in names)  # torch was importable at build time
    assert "grkernels/demo/README.md" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "bench/"))]


def _fresh_venv(tmp: Path, wheel: Path, extra_requirements: tuple[str, ...] = ()) -> tuple[Path, dict]:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    deps = tmp / "deps"
    _link_distributions(_requirement_closure([r for r in requires if "extra ==" not in r]), deps)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_grkernels_test_deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "GRKERNELS_DEBUG")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv, env


GR_STEP = r"""
import sys, torch, grkernels
from grkernels import GradReg
assert grkernels.__file__.startswith(sys.prefix), (grkernels.__file__, sys.prefix)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).double()
x, y = torch.randn(17, 5, dtype=torch.float64), torch.randn(17, 3, dtype=torch.float64)
theta = [p.detach().clone() for p in model.parameters()]
gamma, eps = 0.7, 1e-4
def grad_at(params):
    ps = [p.clone().requires_grad_() for p in params]
    out = torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T + ps[3]
    return torch.autograd.grad((out - y).square().mean(), ps)
g1 = grad_at(theta)                                  # independent: plain autograd at theta and theta + eps*g1
g2 = grad_at([t + eps * g for t, g in zip(theta, g1)])
expected = [a + (gamma / eps) * (b - a) for a, b in zip(g1, g2)]
opt = GradReg(torch.optim.SGD(model.parameters(), lr=1.0), strength=gamma, eps=eps, eps_mode="absolute",
              g1_clip=None, g2_clip=None)   # absolute eps: the recomputation above perturbs theta + eps*g1
def closure():
    loss = (model(x) - y).square().mean()
    loss.backward()
    return loss
opt.step(closure)
got = [t - p.detach() for t, p in zip(theta, model.parameters())]   # SGD at lr 1: theta - theta_new = grad
num = sum(float((a - b).square().sum()) for a, b in zip(got, expected)) ** 0.5
den = sum(float(b.square().sum()) for b in expected) ** 0.5
corr = sum(float((b - a).square().sum()) for a, b in zip(g1, expected)) ** 0.5
assert num / den < 1e-9 and corr / den > 0.05, (num / den, corr / den)
print("GR step ok", num / den, grkernels.info()["GradReg step [cpu]"]["implementation"])
"""

QUICKSTART = r"""
from grkernels.cli import main
assert main(["quickstart", "--steps", "2", "--device", "cpu"]) == 0
"""

TINY_DEMO = ["--steps", "3", "--seeds", "1", "--sft-steps", "3", "--rm-steps", "2", "--rm-pairs", "16",
             "--eval-samples", "8", "--prompts", "2", "--group", "4", "--vocab", "8", "--prompt-len", "2",
             "--completion-len", "3", "--layers", "1", "--width", "16", "--heads", "2", "--workers", "1",
             "--no-progress", "--device", "cpu", "--methods", "none,gr"]


def test_wheel_in_a_fresh_venv(built):
    """The wheel with only its declared dependencies, outside the source tree: ``--version``, ``info``, one GR step
    against an independent recomputation, ``quickstart``, and ``demo`` (a clear message without matplotlib, a run
    with --no-plot, and with the [demo] extra's matplotlib the figure too)."""
    tmp = built["tmp"]
    venv, env = _fresh_venv(tmp, built["wheel"])
    work = tmp / "elsewhere"
    work.mkdir()

    def run(*cmd, ok=True):
        r = subprocess.run([str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        if ok:
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
        return r

    py, exe = venv / "bin" / "python", venv / "bin" / "grkernels"
    assert run(exe, "--version").stdout.startswith(f"grkernels {grkernels.__version__} (torch ")
    r = run(sys.executable, "-m", "pip", "--python", py, "check")  # declared requirements all satisfied
    assert "No broken requirements" in r.stdout, r.stdout
    data = json.loads(run(exe, "info", "--json").stdout)
    assert data["grkernels"] == grkernels.__version__ and data["location"].startswith(str(venv))
    assert data["packages"]["torch"] == torch.__version__
    # only the declared closure is visible: no host package (triton only where torch requires it: CUDA builds)
    assert all(data["packages"][n] is None for n in ("transformers", "trl", "verl", "peft", "liger_kernel")), data
    torch_requires = importlib.metadata.distribution("torch").requires or []
    assert (data["packages"]["triton"] is None) == (not any(r.startswith("triton") for r in torch_requires
                                                            if "extra ==" not in r))
    assert data["backends"]["grkernels._C"]["reason"] == "loaded"  # the wheel's compiled ops load
    out = run(py, "-c", GR_STEP + QUICKSTART).stdout
    assert out.startswith("GR step ok") and out.splitlines()[0].split()[-1] == "cpp", out
    assert "done: final loss" in out

    r = run(exe, "demo", *TINY_DEMO, "--out", work / "d0", ok=False)
    assert r.returncode == 1 and "pip install 'grkernels[demo]'" in r.stderr and not (work / "d0").exists()
    run(exe, "demo", *TINY_DEMO, "--out", work / "d1", "--no-plot")
    assert (work / "d1" / "results.json").is_file() and not (work / "d1" / "demo.png").exists()

    # the [demo] extra: matplotlib's closure added, the demo draws its figure
    with zipfile.ZipFile(built["wheel"]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    demo_reqs = [line.split(": ", 1)[1].split(";")[0] for line in meta.splitlines()
                 if line.startswith("Requires-Dist: ") and 'extra == "demo"' in line]
    _link_distributions(_requirement_closure(demo_reqs), tmp / "deps")
    run(exe, "demo", *TINY_DEMO, "--out", work / "d2")
    assert (work / "d2" / "demo.png").stat().st_size > 1000


def test_makefile_keeps_the_two_commands_and_has_the_package_targets():
    make = (ROOT / "Makefile").read_text()
    for target in ("setup", "demo", "test", "dist", "wheel", "wheel-smoke"):
        assert re.search(rf"^{re.escape(target)}:", make, re.M), target
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):]
    install = install[: install.index("\n## ", 5)]
    first_code = install[install.index("```"):]
    assert first_code.index("make demo") < first_code.index("make test") < first_code.index("pip ")
    assert "grkernels info" in install and "no release on a package registry" in install


# ---------------------------------------------------------------- docs/tested_versions.md
ROW = re.compile(r"^\| (\w+) \| `([^`]+)` \| (dependency|`\[(\w+)\]`) `([^`]+)` \|", re.M)


def test_tested_versions_table_matches_the_installed_packages():
    """Each row's version is the installed one and inside the range its extra admits; every package `grkernels
    info` lists has a row. A package not installed here cannot be checked: the test says which."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    rows = ROW.findall((ROOT / "docs" / "tested_versions.md").read_text())
    assert {r[0] for r in rows} == {n for n, _, _ in about.HOST_PACKAGES}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = about.package_versions()
    unchecked, wrong = [], []
    for name, tested, _, extra, spec in rows:
        declared = project["dependencies"] if not extra else project["optional-dependencies"][extra]
        assert spec in declared, f"{name}: `{spec}` is not in pyproject's {extra or 'dependencies'}"
        have = installed[name]
        if have is None or have.startswith("unknown"):
            unchecked.append(name)
            continue
        base = Version(have).base_version if "+" in have else have  # torch's local build tag (+cpu, +cu128)
        if base != tested or not Requirement(spec).specifier.contains(base, prereleases=True):
            wrong.append(f"| {name} | `{base}` | ...  (table says {tested}; admitted: {spec})")
    assert not wrong, "docs/tested_versions.md is out of date:\n" + "\n".join(wrong)
    if unchecked:
        pytest.skip(f"not installed here, so not checked: {', '.join(unchecked)}")


def test_docs_are_linked_and_name_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):]
    install = install[: install.index("\n## ", 5)]
    for doc in ("docs/from_kl_to_gr.md", "docs/tested_versions.md"):
        assert f"]({doc})" in install, doc
        text = (ROOT / doc).read_text()
        for path in set(re.findall(r"\b((?:tests|examples|docs|grkernels|bench)/[\w/.-]+\.(?:py|md|yaml|json))", text)):
            assert (ROOT / path).exists(), f"{doc} names {path}, which does not exist"
    assert "\nRecommended target: " in (ROOT / "docs" / "from_kl_to_gr.md").read_text()
