"""The ``grkernels`` command line: a bad flag gives a clear message and a non-zero exit, never a traceback;
``grkernels bench`` runs each script in its own process (its messages, its flags, its imports)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grkernels import cli
from grkernels.bench_cli import SCRIPTS
from grkernels.bench_cli import main as bench_main
from grkernels.quickstart import build_parser as quickstart_parser

BAD_QUICKSTART = [
    ["--steps", "0"], ["--steps", "-3"], ["--steps", "2.5"], ["--steps", "x"], ["--eps", "0"], ["--eps", "-1e-3"],
    ["--eps", "inf"], ["--strength", "-1"], ["--strength", "nan"], ["--strength", "Auto"], ["--lr", "0"],
    ["--lr", "x"], ["--target-rel", "0"], ["--target-rel", "nan"], ["--eps-mode", "relative"],
    ["--device", "blah"], ["--device", "cuda:99"], ["--bogus"], ["--steps"],
]
if not torch.cuda.is_available():
    BAD_QUICKSTART.append(["--device", "cuda"])


@pytest.mark.parametrize("flags", BAD_QUICKSTART, ids=" ".join)
def test_quickstart_bad_flags_exit_2_with_a_message(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["quickstart", *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "grkernels quickstart: error:" in err and "Traceback" not in err
    assert flags[0] in err or "unrecognized" in err


def test_quickstart_one_step_runs(capsys):
    assert cli.main(["quickstart", "--steps", "1", "--device", "cpu"]) == 0
    assert "done: final loss" in capsys.readouterr().out


def test_quickstart_defaults_are_the_schemas():
    """The quick-start runs GR at the schema's defaults (one default set everywhere), and its flags reach them."""
    from grkernels.settings import resolve

    schema = resolve().values
    a = quickstart_parser().parse_args([])
    assert (a.strength, a.target_rel, a.eps, a.eps_mode) == (
        schema["strength"], schema["target_rel"], schema["eps"], schema["eps_mode"])
    assert (a.strength, a.target_rel, a.eps, a.eps_mode) == ("auto", 3.0, 0.02, "radius")
    b = quickstart_parser().parse_args(["--strength", "0.5", "--eps-mode", "absolute", "--eps", "1e-3",
                                        "--target-rel", "1"])
    assert (b.strength, b.eps_mode, b.eps, b.target_rel) == (0.5, "absolute", 1e-3, 1.0)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    FLAG_TEXT = st.one_of(st.text(max_size=8), st.integers(-5, 50).map(str),
                          st.floats(allow_nan=True, allow_infinity=True).map(repr))

    @settings(max_examples=60, deadline=None)
    @given(flag=st.sampled_from(["--steps", "--strength", "--target-rel", "--eps", "--lr", "--seed", "--device"]),
           text=FLAG_TEXT)
    def test_quickstart_parser_refuses_or_returns_valid_values(flag, text):
        """Whatever the text: argparse refuses it (status 2), or every parsed value is one the run accepts."""
        parser = quickstart_parser()
        parser.error = lambda message: (_ for _ in ()).throw(SystemExit(2))  # no usage print per example
        try:
            a = parser.parse_args([flag, text])
        except SystemExit as stop:
            assert stop.code == 2
            return
        assert a.steps >= 1 and (a.strength == "auto" or (math.isfinite(a.strength) and a.strength >= 0))
        assert math.isfinite(a.target_rel) and a.target_rel > 0
        assert math.isfinite(a.eps) and a.eps > 0 and math.isfinite(a.lr) and a.lr > 0
        torch.empty(0, device=a.device)


def test_top_level_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["nope"])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--bogus"])
    assert stop.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_an_error_inside_a_command_is_one_line_and_status_1(capsys, monkeypatch):
    def broken(argv):
        raise ValueError("something the flags led to")

    monkeypatch.delenv("GRKERNELS_DEBUG", raising=False)
    assert cli._run_cleanly("quickstart", broken, []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: something the flags led to" in err
    monkeypatch.setenv("GRKERNELS_DEBUG", "1")
    with pytest.raises(ValueError):
        cli._run_cleanly("quickstart", broken, [])


# ---------------------------------------------------------------- bench
def fake_bench(tmp_path):
    """Scripts standing in for bench/: one imports triton with the interpreter off (as a GPU benchmark on CPU
    would), one reports what it sees and fails with its own message."""
    (tmp_path / SCRIPTS["overhead"]).write_text(textwrap.dedent("""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        try:
            import triton  # noqa: F401
        except ImportError:
            pass
        print("overhead ran")
    """))
    (tmp_path / SCRIPTS["fidelity"]).write_text(textwrap.dedent("""
        import sys
        print("fidelity args", sys.argv[1:], "triton already imported:", "triton" in sys.modules)
        raise SystemExit("fidelity: needs a CUDA device (its own message)")
    """))
    return str(tmp_path)


def test_bench_runs_each_script_in_its_own_process(tmp_path, capfd):
    d = fake_bench(tmp_path)
    assert bench_main(["--bench-dir", d, "--only", "overhead,fidelity"]) == 1
    out, err = capfd.readouterr()
    assert "overhead ran" in out
    assert "fidelity args [] triton already imported: False" in out  # the earlier script's import did not leak
    assert "fidelity: needs a CUDA device (its own message)" in err  # the script's message is shown
    assert "[bench] fidelity exited with status 1" in err and "[bench] failed: ['fidelity']" in err


def test_bench_passes_flags_after_double_dash(tmp_path, capfd):
    d = fake_bench(tmp_path)
    assert bench_main(["--bench-dir", d, "--only", "fidelity", "--", "--quick", "--seeds", "1"]) == 1
    assert "fidelity args ['--quick', '--seeds', '1']" in capfd.readouterr().out


@pytest.mark.parametrize("flags,match", [
    (["--only", "nope"], "unknown benchmark"), (["--only", ","], "no benchmark"),
    (["--", "--quick"], "go to one script"), (["--bench-dir", "/nonexistent/bench"], "not a folder"),
])
def test_bench_bad_flags(tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", *(["--bench-dir", str(tmp_path)] if "--bench-dir" not in flags else []), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter matters on CPU only")
def test_fidelity_detects_triton_imported_before_the_interpreter():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = textwrap.dedent("""
        import sys
        import triton  # an earlier benchmark in this process, interpreter off
        sys.path.insert(0, "bench")
        import fidelity
        assert fidelity._TRITON_TOO_EARLY
        sys.argv = ["fidelity.py", "--backend", "triton", "--device", "cpu"]
        fidelity.main()
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "in a process of its own" in out.stderr, out.stderr[-2000:]
    clean = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); import fidelity; "
                            "assert not fidelity._TRITON_TOO_EARLY"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]


@pytest.mark.parametrize("command", ["demo", "quickstart", "bench", "info"])
def test_every_subcommand_refuses_an_unknown_flag(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--no-such-flag", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
