"""scripts/test.sh, the README's test command: Debian's browser installed as root, else one line saying how.

Run dry (FIREEDIT_TEST_DRY_RUN=1: the pytest command printed, not run) on a PATH that holds only what the script
calls, with fakes of `id` (root or not) and `apt-get` (a log of its arguments; `install` puts fake chromium and
chromedriver on the PATH, after an `update` only where asked), so no real browser on this machine is seen.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "test.sh"


def fake_machine(tmp_path, *, uid: int, apt: bool = True, install_needs_update: bool = False) -> pathlib.Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "chmod"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "id").write_text(f"#!{shutil.which('bash')}\necho {uid}\n")
    if apt:
        (bin_dir / "apt-get").write_text(f"""#!{shutil.which('bash')}
echo "$*" >> {tmp_path}/apt.log
if [[ "$*" == *update* ]]; then : > {tmp_path}/updated; exit 0; fi
if {str(install_needs_update).lower()} && [[ ! -e {tmp_path}/updated ]]; then exit 100; fi
for tool in chromium chromedriver; do printf '#!/bin/sh\\n' > {bin_dir}/$tool; chmod +x {bin_dir}/$tool; done
""")
    for tool in bin_dir.iterdir():
        if not tool.is_symlink():
            tool.chmod(0o755)
    return bin_dir


def run_script(bin_dir, *args):
    env = {"PATH": str(bin_dir), "FIREEDIT_TEST_DRY_RUN": "1", "HOME": str(bin_dir.parent)}
    done = subprocess.run([shutil.which("bash"), str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    pytest_command = " ".join([".venv/bin/python -m pytest tests --durations=15 -q", *args])
    assert done.stdout.splitlines()[-1] == f"would run: {pytest_command}"
    return done


def test_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    shellcheck = pathlib.Path(sys.executable).with_name("shellcheck")
    done = subprocess.run([str(shellcheck), "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("apt", [True, False], ids=["apt-get", "no-apt-get"])
def test_not_root_prints_one_line_and_runs_the_tests(tmp_path, apt):
    bin_dir = fake_machine(tmp_path, uid=1000, apt=apt)
    done = run_script(bin_dir, "-k", "unet")
    assert not (tmp_path / "apt.log").exists()  # never tried without root
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("scripts/test.sh: chromium chromedriver not found")
    assert "apt-get install -y chromium chromium-driver" in lines[0]


@pytest.mark.parametrize("needs_update", [False, True], ids=["install", "update-then-install"])
def test_root_installs_the_browser(tmp_path, needs_update):
    bin_dir = fake_machine(tmp_path, uid=0, install_needs_update=needs_update)
    done = run_script(bin_dir)
    calls = (tmp_path / "apt.log").read_text().splitlines()
    install = "install -y -qq chromium chromium-driver"
    assert calls == ([install, "update -qq", install] if needs_update else [install])
    assert done.stderr == "" and (bin_dir / "chromedriver").exists()


def test_present_browser_is_left_alone(tmp_path):
    bin_dir = fake_machine(tmp_path, uid=0)
    for tool in ("chromium", "chromedriver"):
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    done = run_script(bin_dir)
    assert done.stderr == "" and not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize("venv", ["missing", "lacks-a-module"])
def test_missing_or_incomplete_venv_is_installed(tmp_path, venv):
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, checkout / "scripts" / "test.sh")
    if venv == "lacks-a-module":
        (checkout / ".venv" / "bin").mkdir(parents=True)
        for tool, code in (("python", 1), ("shellcheck", 0)):  # find_spec found a module missing
            (checkout / ".venv" / "bin" / tool).write_text(f"#!/bin/sh\nexit {code}\n")
            (checkout / ".venv" / "bin" / tool).chmod(0o755)
    bin_dir = fake_machine(tmp_path, uid=1000)
    env = {"PATH": str(bin_dir), "FIREEDIT_TEST_DRY_RUN": "1"}
    done = subprocess.run([shutil.which("bash"), str(checkout / "scripts" / "test.sh")], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "would run: bash scripts/install.sh"
