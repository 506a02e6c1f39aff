"""scripts/ensure_env.sh, the set-up step of run_demo.sh and run_tests.sh (and so of CI)."""
import hashlib
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_df(tmp_path, free_kb: int) -> str:
    """A `df` on PATH that reports `free_kb` kilobytes available, in POSIX format."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/x 100000000 1 {free_kb} 1% /'\n")
    df.chmod(0o755)
    return str(bin_dir)


def test_a_new_venv_is_refused_up_front_when_the_disk_is_nearly_full(tmp_path):
    venv = tmp_path / "envs" / "venv"
    env = {**os.environ, "PATH": _fake_df(tmp_path, 300 * 1024) + os.pathsep + os.environ["PATH"],
           "VICHA_VENV": str(venv)}
    result = subprocess.run(["bash", "-c", f"source {REPO}/scripts/ensure_env.sh"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"creating {venv} needs about 6.5 GB free" in result.stderr and "only 300 MB left" in result.stderr
    assert not venv.exists()  # nothing half-installed left behind


def test_an_up_to_date_venv_is_used_whatever_the_free_space(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    with open(os.path.join(REPO, "envs", "requirements.txt"), "rb") as handle:
        (venv / ".requirements.sha256").write_text(hashlib.sha256(handle.read()).hexdigest() + "\n")
    env = {**os.environ, "PATH": _fake_df(tmp_path, 0) + os.pathsep + os.environ["PATH"], "VICHA_VENV": str(venv)}
    result = subprocess.run(["bash", "-c", f"source {REPO}/scripts/ensure_env.sh && echo \"$PY\""], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(python)
