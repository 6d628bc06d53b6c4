"""launch/*.sh build the right launcher command for a given environment, and the Dockerfiles agree
with the repository (COPY sources exist, pins equal requirements.txt and the Makefile, non-root users).

The scripts run for real with a fake `torchrun`/`deepspeed` (TORCHRUN/DEEPSPEED) that prints its
argv and environment, and a fake `nvidia-smi` first on PATH that lists as many GPUs as a test wants.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from seqrec.launch.k8s import APP_ROOT, SPARK_UID, TRAIN_UID

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "launch" / "train.sh"
DS_SH = REPO / "launch" / "deepspeed_hostfile.sh"
SHOWN_ENV = (
    "OMP_NUM_THREADS", "DS_ACCELERATOR", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_SOCKET_IFNAME", "DS_ENV_FILE",
)
FAKE_LAUNCHER = f"""#!/usr/bin/env python3
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in {SHOWN_ENV!r}}}}}))
"""


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def sandbox(tmp_path: Path):
    """(run, tmp_path): run(script, args, env, gpus) -> CompletedProcess with a clean environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = write_exe(tmp_path / "fake_launcher.py", FAKE_LAUNCHER)

    def run(script: Path, args: list[str], env: dict[str, str] | None = None, gpus: int = 0):
        gpu_lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
        write_exe(bin_dir / "nvidia-smi", "#!/bin/sh\n" + gpu_lines)  # shadows a real one
        full_env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
            "TORCHRUN": str(launcher), "DEEPSPEED": str(launcher), **(env or {}),
        }
        return subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True, text=True, timeout=60)

    return run, tmp_path


def launched(done: subprocess.CompletedProcess[str]) -> tuple[list[str], dict[str, str | None]]:
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    return record["argv"], record["env"]


def reference_cpus() -> int:
    """CPUs the script should count: affinity (nproc), lowered by a cgroup v2/v1 CPU quota."""
    n = len(os.sched_getaffinity(0))
    quota = period = None
    if Path("/sys/fs/cgroup/cpu.max").exists():
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    elif Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
        quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
        period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
    if quota and quota.isdigit() and int(quota) > 0 and period and int(period) > 0:
        n = min(n, -(-int(quota) // int(period)))
    return max(n, 1)


TRAIN_TAIL = ["--max-restarts", "0", "-m", "seqrec", "train"]


def test_single_cpu_node_runs_standalone(sandbox) -> None:
    run, _ = sandbox
    argv, env = launched(run(TRAIN_SH, ["--config", "my run.toml", "--set", "train.max_steps=5"]))
    assert argv == ["--nnodes", "1", "--nproc-per-node", "2", "--standalone", *TRAIN_TAIL,
                    "--config", "my run.toml", "--set", "train.max_steps=5"]
    assert env["DS_ACCELERATOR"] == "cpu" and env["NCCL_DEBUG"] is None
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] is None
    assert env["OMP_NUM_THREADS"] == str(max(1, reference_cpus() // 2))


@pytest.mark.parametrize(("node_rank", "is_host"), [("0", "1"), ("1", "0")])
def test_multi_node_c10d_rendezvous_hosted_by_node_0(sandbox, node_rank: str, is_host: str) -> None:
    run, _ = sandbox
    env = {"NNODES": "2", "NODE_RANK": node_rank, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234",
           "NPROC_PER_NODE": "1", "RDZV_TIMEOUT": "30"}
    argv, _ = launched(run(TRAIN_SH, ["--config", "c.toml"], env))
    assert argv == [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "seqrec",
        "--rdzv-endpoint", "10.0.0.5:1234", "--rdzv-conf", f"is_host={is_host},join_timeout=30,read_timeout=30",
        *TRAIN_TAIL, "--config", "c.toml",
    ]


def test_pytorchjob_environment_on_gpus(sandbox) -> None:
    """What the Kubeflow operator sets on worker 2 of a 4-node job with nprocPerNode 8."""
    run, _ = sandbox
    env = {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_NPROC_PER_NODE": "8", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "23456", "RANK": "3", "WORLD_SIZE": "32", "NCCL_SOCKET_IFNAME": "eth0"}
    argv, seen = launched(run(TRAIN_SH, [], env, gpus=8))
    assert argv[:4] == ["--nnodes", "4", "--nproc-per-node", "8"]
    assert argv[argv.index("--rdzv-endpoint") + 1] == "127.0.0.1:23456"
    assert argv[argv.index("--rdzv-conf") + 1].startswith("is_host=0,")
    assert seen["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and seen["NCCL_DEBUG"] == "WARN"
    assert seen["NCCL_SOCKET_IFNAME"] == "eth0" and seen["DS_ACCELERATOR"] is None
    assert seen["OMP_NUM_THREADS"] == str(max(1, reference_cpus() // 8))


@pytest.mark.parametrize(("index", "is_host"), [("0", "1"), ("3", "0")])
def test_indexed_job_takes_node_rank_from_completion_index(sandbox, index: str, is_host: str) -> None:
    run, _ = sandbox
    env = {"NNODES": "4", "JOB_COMPLETION_INDEX": index, "MASTER_ADDR": "localhost", "RDZV_ID": "job-a"}
    argv, _ = launched(run(TRAIN_SH, [], env, gpus=2))
    assert argv[argv.index("--rdzv-id") + 1] == "job-a"
    assert argv[argv.index("--rdzv-conf") + 1].startswith(f"is_host={is_host},")
    assert argv[argv.index("--nproc-per-node") + 1] == "2"


def test_external_rendezvous_endpoint_and_visible_devices(sandbox) -> None:
    run, _ = sandbox
    env = {"NNODES": "1:4", "RDZV_ENDPOINT": "rdzv.svc:2379", "RDZV_ID": "x", "CUDA_VISIBLE_DEVICES": "0,1",
           "OMP_NUM_THREADS": "7", "NCCL_DEBUG": "INFO", "MAX_RESTARTS": "3"}
    argv, seen = launched(run(TRAIN_SH, [], env, gpus=8))
    assert argv == [
        "--nnodes", "1:4", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-id", "x",
        "--rdzv-endpoint", "rdzv.svc:2379", "--rdzv-conf", "join_timeout=900,read_timeout=900",
        "--max-restarts", "3", "-m", "seqrec", "train",
    ]
    assert seen["OMP_NUM_THREADS"] == "7" and seen["NCCL_DEBUG"] == "INFO"  # what the user set wins


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "0"}, "NNODES must be a positive integer or MIN:MAX, got '0'"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 is not below NNODES=2"),
        ({"NNODES": "2"}, "MASTER_ADDR (node 0's host) or RDZV_ENDPOINT must be set when NNODES=2"),
        ({"NPROC_PER_NODE": "many"}, "NPROC_PER_NODE must be a positive integer, auto, gpu or cpu, got 'many'"),
        ({"NPROC_PER_NODE": "gpu"}, "NPROC_PER_NODE=gpu means 0 processes on this node"),
    ],
)
def test_bad_topology_is_one_line_exit_2(sandbox, env: dict[str, str], message: str) -> None:
    run, _ = sandbox
    done = run(TRAIN_SH, [], env)
    assert done.returncode == 2 and done.stdout == ""  # the launcher never started
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.sh: error: {message}"), lines


def test_unresolvable_master_fails_after_the_dns_wait(sandbox) -> None:
    run, _ = sandbox
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "no-such-node.invalid", "RDZV_DNS_WAIT": "0"}
    done = run(TRAIN_SH, [], env)
    assert done.returncode == 1 and done.stdout == ""
    assert "cannot resolve MASTER_ADDR=no-such-node.invalid after 0s" in done.stderr


def test_deepspeed_single_node_default_hostfile(sandbox) -> None:
    run, tmp = sandbox
    argv, env = launched(run(DS_SH, ["--config", "c.toml"]))
    hostfile = tmp / f"seqrec-hostfile-{os.getuid()}"
    assert hostfile.read_text() == "localhost slots=2\n"
    assert argv == [
        "--hostfile", str(hostfile), "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1",
        "--master_port", "29500", "--no_ssh_check", "--no_local_rank", "--module", "seqrec", "train",
        "--config", "c.toml",
    ]
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert env["DS_ACCELERATOR"] == "cpu" and env["DS_ENV_FILE"] is None


def test_deepspeed_multi_node_hostfile_forwards_settings_but_no_secret(sandbox) -> None:
    run, tmp = sandbox
    hostfile = tmp / "hosts"
    hostfile.write_text("# training nodes\nnode-a slots=8\n\nnode-b slots=8  # second\n")
    env = {"HOSTFILE": str(hostfile), "WANDB_API_KEY": "sekrit-value", "WANDB_PROJECT": "recs"}
    argv, seen = launched(run(DS_SH, [], env, gpus=8))
    assert argv[:10] == ["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8",
                         "--master_addr", "node-a", "--master_port", "29500"]
    assert "--no_ssh_check" not in argv  # several nodes: the launcher reaches them over ssh
    assert argv[argv.index("--no_local_rank") :] == ["--no_local_rank", "--module", "seqrec", "train"]
    env_file = Path(seen["DS_ENV_FILE"])
    lines = env_file.read_text().splitlines()
    assert lines == [f"OMP_NUM_THREADS={seen['OMP_NUM_THREADS']}", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                     "NCCL_DEBUG=WARN", "WANDB_PROJECT=recs"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "sekrit-value" not in env_file.read_text() + " ".join(argv)


def test_deepspeed_rejects_more_nodes_than_the_hostfile_lists(sandbox) -> None:
    run, tmp = sandbox
    (tmp / "hosts").write_text("node-a slots=2\n")
    done = run(DS_SH, [], {"HOSTFILE": str(tmp / "hosts"), "NUM_NODES": "3"})
    assert done.returncode == 2 and done.stdout == ""
    assert "NUM_NODES=3 but" in done.stderr and "lists 1 host(s)" in done.stderr


SCRIPTS = [TRAIN_SH, DS_SH, REPO / "launch" / "local_cpu.sh", REPO / "k8s" / "regenerate.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------------------------------------------
# Container images (no Docker engine here: check what a build would need)
# ---------------------------------------------------------------------------------------------------


def dockerfile_lines(name: str) -> list[str]:
    """Instructions of docker/<name> with continuation lines joined and comments dropped."""
    text = (REPO / "docker" / name).read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.spark"])
def test_dockerfile_copy_sources_exist_and_user_is_not_root(name: str) -> None:
    lines = dockerfile_lines(name)
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [src for words in copies for src in words if not src.startswith("--")]
    assert sources and all((REPO / src).exists() for src in sources), sources
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    expected = TRAIN_UID if name == "Dockerfile.train" else SPARK_UID
    assert users[-1].split(":")[0] == str(expected)  # the uid the manifests run as
    base = next(line for line in lines if line.startswith("ARG ") and "IMAGE=" in line).split("=", 1)[1]
    tag = base.rsplit(":", 1)[-1]
    assert ":" in base and tag != "latest" and re.search(r"\d+\.\d+", tag), base


def test_train_image_installs_the_pinned_stack() -> None:
    lines = dockerfile_lines("Dockerfile.train")
    text = "\n".join(lines)
    assert "python -m pip install -r requirements.txt" in text
    assert not re.search(r"^torch\b", (REPO / "requirements.txt").read_text(), re.M)  # the image's CUDA torch stays
    makefile_pin = re.search(r"^PETASTORM_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"ARG PETASTORM_VERSION={makefile_pin}" in lines
    assert 'pip install --no-deps "petastorm==${PETASTORM_VERSION}"' in text
    assert f"WORKDIR {APP_ROOT}" in lines and "COPY launch ./launch" in lines  # /opt/seqrec/launch/train.sh


def test_spark_image_pins_equal_requirements() -> None:
    text = "\n".join(dockerfile_lines("Dockerfile.spark"))
    pattern = re.search(r"grep -E '([^']+)' requirements\.txt", text).group(1)
    picked = [line for line in (REPO / "requirements.txt").read_text().splitlines() if re.match(pattern, line)]
    assert sorted(p.split("==")[0] for p in picked) == ["numpy", "pandas", "pyarrow"]
    assert f"-eq {len(picked)}" in text  # the build fails if a pin disappears from requirements.txt
    assert "torch" not in text and "deepspeed" not in text


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "data", "runs", "wandb"} <= ignored
