"""`seqrec launch k8s`: rendered manifests validate offline, keep their shape at every size, never carry
a secret, refuse impossible settings in one line, and stay equal to the checked-in k8s/ folders."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml
from hypothesis import given
from hypothesis import strategies as st

from seqrec.cli import build_parser
from seqrec.cli import main as cli_main
from seqrec.config import load_config
from seqrec.launch import render_texts, spec_from_args
from seqrec.launch.k8s import SPARK_PYTHON, SPARK_VERSION
from seqrec.launch.spec import cluster_config
from seqrec.launch.toml_writer import config_delta, dumps

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
IMAGES = ["--image", "reg.example/seqrec-train:1.0", "--spark-image", "reg.example/seqrec-spark:1.0"]
# A global batch and a shard layout that every size up to 16 x 8 GPUs can split (see k8s/regenerate.sh).
FITS_ALL = ["--set", "train.global_batch_size=8192", "--set", "prepare.shards.max_world_size=128"]
K8S_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())
CORE_KINDS = {"ConfigMap", "PersistentVolumeClaim", "Service", "Job"}


def parse(*argv: str):
    return build_parser().parse_args(["launch", "k8s", *argv])


def render(*argv: str) -> dict[str, dict[str, Any]]:
    """{file name: manifest} as the CLI would write them (the same code path, without printing)."""
    args = parse(*argv)
    cfg = load_config(args.config, args.overrides)
    return {name: yaml.safe_load(text) for name, text in render_texts(cfg, spec_from_args(args, cfg)).items()}


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEQREC_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "seqrec", "launch", "k8s", *argv],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60,
    )


# ---------------------------------------------------------------------------------------------------
# Validation helpers: core objects against the bundled Kubernetes schemas, CRDs by structure
# ---------------------------------------------------------------------------------------------------


def validate_core(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def validate_pod_template(template: dict[str, Any], name: str) -> None:
    """kubernetes-validate has no CRD schemas: wrap a CRD's pod template in a core PodTemplate."""
    validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


def check_pytorchjob(job: dict[str, Any], nodes: int, procs: int) -> None:
    """The kubeflow.org/v1 PyTorchJob fields the training operator reads."""
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert set(spec) <= {"elasticPolicy", "nprocPerNode", "pytorchReplicaSpecs", "runPolicy"}
    assert spec["nprocPerNode"] == str(procs)
    assert set(spec["runPolicy"]) <= {
        "activeDeadlineSeconds", "backoffLimit", "cleanPodPolicy", "managedBy", "schedulingPolicy",
        "suspend", "ttlSecondsAfterFinished",
    }
    assert spec["runPolicy"]["cleanPodPolicy"] in {"All", "Running", "None"}
    assert isinstance(spec["runPolicy"]["backoffLimit"], int) and spec["runPolicy"]["backoffLimit"] >= nodes
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == ({"Master", "Worker"} if nodes > 1 else {"Master"})
    assert replicas["Master"]["replicas"] == 1
    assert sum(r["replicas"] for r in replicas.values()) == nodes
    for role, replica in replicas.items():
        assert set(replica) == {"replicas", "restartPolicy", "template"}
        assert replica["restartPolicy"] == "OnFailure"
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator injects its env into this container
        assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container["ports"]
        validate_pod_template(replica["template"], f"{job['metadata']['name']}-{role.lower()}")


SPARK_SPEC_KEYS = {
    "type", "sparkVersion", "mode", "proxyUser", "image", "imagePullPolicy", "imagePullSecrets", "mainClass",
    "mainApplicationFile", "arguments", "sparkConf", "hadoopConf", "sparkConfigMap", "hadoopConfigMap",
    "volumes", "driver", "executor", "deps", "restartPolicy", "nodeSelector", "failureRetries",
    "retryInterval", "pythonVersion", "memoryOverheadFactor", "monitoring", "batchScheduler",
    "timeToLiveSeconds", "batchSchedulerOptions", "sparkUIOptions", "driverIngressOptions", "dynamicAllocation",
}
SPARK_POD_KEYS = {
    "template", "cores", "coreLimit", "memory", "memoryOverhead", "gpu", "image", "configMaps", "secrets",
    "env", "envVars", "envFrom", "envSecretKeyRefs", "labels", "annotations", "volumeMounts", "affinity",
    "tolerations", "podSecurityContext", "securityContext", "schedulerName", "sidecars", "initContainers",
    "hostNetwork", "nodeSelector", "dnsConfig", "terminationGracePeriodSeconds", "serviceAccount",
    "hostAliases", "shareProcessNamespace", "runtimeClassName",
}
DRIVER_KEYS = SPARK_POD_KEYS | {
    "podName", "coreRequest", "javaOptions", "lifecycle", "kubernetesMaster", "serviceAnnotations",
    "serviceLabels", "ports", "priorityClassName",
}
EXECUTOR_KEYS = SPARK_POD_KEYS | {
    "instances", "coreRequest", "javaOptions", "lifecycle", "deleteOnTermination", "ports", "priorityClassName",
}
JVM_SIZE = re.compile(r"^([1-9][0-9]*)([kmgt])$")


def spark_pod_template(app: dict[str, Any], role: str) -> dict[str, Any]:
    """The pod the operator builds for the driver or an executor, as a core PodTemplateSpec."""
    spec, pod = app["spec"], app["spec"][role]
    number, unit = JVM_SIZE.match(pod["memory"]).groups()
    container = {
        "name": f"spark-kubernetes-{role}",
        "image": pod.get("image", spec["image"]),
        "env": pod.get("env", []),
        "volumeMounts": pod["volumeMounts"],
        "securityContext": pod["securityContext"],
        "resources": {"requests": {"cpu": str(pod["cores"]), "memory": f"{number}{unit.upper()}i"}},
    }
    pod_spec = {"securityContext": pod["podSecurityContext"], "containers": [container], "volumes": spec["volumes"]}
    if "serviceAccount" in pod:
        pod_spec["serviceAccountName"] = pod["serviceAccount"]
    return {"metadata": {"labels": pod["labels"]}, "spec": pod_spec}


def check_spark_application(app: dict[str, Any]) -> None:
    """The sparkoperator.k8s.io/v1beta2 fields (api/v1beta2/sparkapplication_types.go of the operator)."""
    assert app["apiVersion"] == "sparkoperator.k8s.io/v1beta2" and app["kind"] == "SparkApplication"
    spec = app["spec"]
    assert set(spec) <= SPARK_SPEC_KEYS
    assert {"type", "sparkVersion", "mainApplicationFile", "driver", "executor"} <= set(spec)
    assert spec["type"] == "Python" and spec["pythonVersion"] in {"2", "3"} and spec["mode"] == "cluster"
    assert spec["sparkVersion"] == SPARK_VERSION
    assert spec["mainApplicationFile"] == "local:///opt/seqrec/spark_jobs/build_sequences.py"
    assert (REPO / "spark_jobs" / "build_sequences.py").is_file()
    assert all(isinstance(a, str) for a in spec["arguments"]) and spec["arguments"][:2] == ["--config", "/etc/seqrec/run.toml"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in spec["sparkConf"].items())
    assert spec["restartPolicy"]["type"] == "OnFailure"
    assert set(spec["restartPolicy"]) <= {
        "type", "onSubmissionFailureRetries", "onFailureRetries", "onSubmissionFailureRetryInterval",
        "onFailureRetryInterval",
    }
    assert set(spec["driver"]) <= DRIVER_KEYS and set(spec["executor"]) <= EXECUTOR_KEYS
    assert isinstance(spec["executor"]["instances"], int) and spec["executor"]["instances"] >= 1
    for role in ("driver", "executor"):
        assert isinstance(spec[role]["cores"], int) and spec[role]["cores"] >= 1
        validate_pod_template(spark_pod_template(app, role), f"{app['metadata']['name']}-{role}")


def check_all(files: dict[str, dict[str, Any]], nodes: int, procs: int) -> None:
    for obj in files.values():
        if obj["kind"] in CORE_KINDS:
            validate_core(obj)
    if "prepare.yaml" in files:
        check_spark_application(files["prepare.yaml"])
    if files["train.yaml"]["kind"] == "PyTorchJob":
        check_pytorchjob(files["train.yaml"], nodes, procs)


def train_pod(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    job = files["train.yaml"]
    if job["kind"] == "Job":
        return job["spec"]["template"]["spec"]
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


# ---------------------------------------------------------------------------------------------------
# Sizes and kinds
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pytorchjob", "indexed-job"])
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (2, 8), (16, 8), (2, 0)])
def test_rendered_manifests_validate(kind: str, nodes: int, gpus: int) -> None:
    files = render(*IMAGES, *FITS_ALL, "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--job-kind", kind)
    extra = {"service.yaml"} if kind == "indexed-job" else set()
    assert set(files) == {"configmap.yaml", "pvc-data.yaml", "prepare.yaml", "train.yaml"} | extra
    procs = gpus or 2
    check_all(files, nodes, procs)
    pod = train_pod(files)
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    if gpus:
        assert resources["limits"]["nvidia.com/gpu"] == str(gpus)
        assert resources["limits"]["cpu"] == str(8 * gpus) and resources["limits"]["memory"] == f"{32 * gpus}Gi"
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        assert "nvidia.com/gpu" not in resources["limits"] and "tolerations" not in pod
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": f"{8 * gpus}Gi" if gpus else "4Gi"}  # a quarter of memory


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_indexed_job_rendezvous_through_headless_service(nodes: int) -> None:
    files = render(*IMAGES, *FITS_ALL, "--nodes", str(nodes), "--gpus-per-node", "8", "--job-kind", "indexed-job",
                   "--name", "rec-a", "--namespace", "ml")
    job, service = files["train.yaml"], files["service.yaml"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert job["spec"]["backoffLimit"] == 10 * nodes
    template = job["spec"]["template"]
    assert template["spec"]["subdomain"] == service["metadata"]["name"] == "rec-a"
    assert template["spec"]["restartPolicy"] == "OnFailure"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["NNODES"] == str(nodes) and env["NPROC_PER_NODE"] == "8"
    assert env["MASTER_ADDR"] == "rec-a-0.rec-a" and env["MASTER_PORT"] == "29500" and env["RDZV_ID"] == "rec-a"
    assert "NODE_RANK" not in env  # launch/train.sh takes JOB_COMPLETION_INDEX, set by Kubernetes
    assert {o["metadata"]["namespace"] for o in files.values()} == {"ml"}


def test_pod_security_and_volumes() -> None:
    files = render(*IMAGES, "--name", "sec")
    pod = train_pod(files)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    for container in pod["containers"] + pod["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"/etc/seqrec": "config", "/workspace": "data", "/dev/shm": "dshm", "/tmp": "tmp"}
    assert pod["containers"][0]["command"] == ["/opt/seqrec/launch/train.sh"]
    assert pod["containers"][0]["args"] == ["--config", "/etc/seqrec/run.toml"]
    wait = pod["initContainers"][0]
    assert {"name": "MANIFEST", "value": "/workspace/data/demo/shards/manifest.json"} in wait["env"]
    for role in ("driver", "executor"):
        ctx = files["prepare.yaml"]["spec"][role]["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["capabilities"] == {"drop": ["ALL"]}


# ---------------------------------------------------------------------------------------------------
# The run config inside the ConfigMap
# ---------------------------------------------------------------------------------------------------


def configmap_config(files: dict[str, dict[str, Any]], tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text(files["configmap.yaml"]["data"]["run.toml"])
    tomllib.loads(path.read_text())  # valid TOML on its own
    return load_config(path)


def test_configmap_holds_the_run_config_with_paths_on_the_volume(tmp_path: Path) -> None:
    sets = ["--set", "train.max_steps=77", "--set", "prepare.input.path='/abs/events'", "--set", "name=exp 1"]
    files = render(*IMAGES, *sets, "--name", "exp-1")
    pod_cfg = configmap_config(files, tmp_path)
    cfg = load_config(None, [s for s in sets if s != "--set"])
    args = parse(*IMAGES, *sets, "--name", "exp-1")
    assert pod_cfg == cluster_config(cfg, spec_from_args(args, cfg))
    assert pod_cfg.train.max_steps == 77 and pod_cfg.name == "exp 1"
    assert pod_cfg.prepare.input.path == "/abs/events"  # absolute paths are the user's choice
    assert pod_cfg.data.path == "/workspace/data/demo/shards" == pod_cfg.prepare.output
    assert pod_cfg.prepare.input.item_features_path == "/workspace/data/demo/log/items.parquet"
    assert pod_cfg.run_dir == "/workspace/runs/demo"


def test_toml_writer_round_trips_a_config(tmp_path: Path) -> None:
    overrides = {
        "name": '"quote \\" back\\\\slash\\nnewline \\u00e9 \\u007f tab\\t"',
        "optim.lr": "1e-05",
        "optim.min_lr_ratio": "0.0",
        "train.max_steps": "123456789",
        "train.precision": '"bf16"',
        "eval.ks": "[5, 20]",
        "eval.exclude_seen": "false",
        "prepare.input.valid_actions": '["view", "buy it"]',
        "prepare.input.columns.context": '["device"]',
        "prepare.filters.min_rating": "3.5",
        "prepare.input.columns.rating": "\"stars\"",
        "prepare.filters.start_time": "1700000000",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.name == 'quote " back\\slash\nnewline \u00e9 \x7f tab\t'
    path = tmp_path / "run.toml"
    path.write_text(dumps(config_delta(cfg)))
    assert load_config(path) == cfg
    assert config_delta(load_config(None)) == {} and dumps({}) == ""


@given(st.text())
def test_toml_strings_round_trip(text: str) -> None:
    assert tomllib.loads(dumps({"v": text}))["v"] == text


def test_separate_checkpoint_claim(tmp_path: Path) -> None:
    files = render(*IMAGES, "--checkpoints", "ckpt-fast")
    assert files["pvc-checkpoints.yaml"]["metadata"]["name"] == "ckpt-fast"
    assert files["pvc-data.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert configmap_config(files, tmp_path).run_dir == "/checkpoints/runs/demo"
    pod = train_pod(files)
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt-fast"}} in pod["volumes"]
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in pod["containers"][0]["volumeMounts"]
    assert "checkpoints" not in str(files["prepare.yaml"]["spec"]["volumes"])
    assert "pvc-data.yaml" not in render(*IMAGES, "--no-pvc")


def test_object_store_data(tmp_path: Path) -> None:
    files = render(*IMAGES, "--data", "s3a://bucket/seqrec/", "--checkpoints", "ckpt")
    check_all(files, 1, 1)
    pod_cfg = configmap_config(files, tmp_path)
    assert pod_cfg.prepare.input.path == "s3a://bucket/seqrec/data/demo/log/events"
    assert pod_cfg.data.path == "s3a://bucket/seqrec/data/demo/shards"
    assert pod_cfg.run_dir == "/checkpoints/runs/demo"
    assert set(files) == {"configmap.yaml", "pvc-checkpoints.yaml", "prepare.yaml", "train.yaml"}
    app = files["prepare.yaml"]["spec"]
    assert app["deps"]["packages"] == ["org.apache.hadoop:hadoop-aws:3.4.1"]
    assert [v["name"] for v in app["volumes"]] == ["config"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in app["driver"]["env"]}
    assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} and all(r["optional"] for r in refs.values())
    assert "initContainers" not in train_pod(files)  # no volume to watch for the manifest


# ---------------------------------------------------------------------------------------------------
# Secrets, errors, apply
# ---------------------------------------------------------------------------------------------------


def test_secrets_never_appear_in_rendered_output(tmp_path: Path) -> None:
    secret_env = {"WANDB_API_KEY": "sekrit-value", "AWS_SECRET_ACCESS_KEY": "sekrit-value"}
    out = tmp_path / "out"
    for kind, extra in (("pytorchjob", []), ("indexed-job", ["--output", str(out)])):
        done = run_cli(*IMAGES, "--job-kind", kind, "--data", "s3a://b/p", "--checkpoints", "c", *extra,
                       env=secret_env)
        assert done.returncode == 0, done.stderr
        assert "sekrit-value" not in done.stdout + done.stderr
    written = "".join(p.read_text() for p in out.iterdir())
    assert "sekrit-value" not in written and written.count("secretKeyRef") == 5  # W&B + 2 AWS x driver/executor
    for kind in ("pytorchjob", "indexed-job"):
        refs = [e for e in train_pod(render(*IMAGES, "--job-kind", kind))["containers"][0]["env"]
                if e["name"] == "WANDB_API_KEY"]
        assert refs == [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "wandb", "key": "WANDB_API_KEY", "optional": True}}}]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--image", ""], "--image is required"),
        (["--gpus-per-node", "9"], "--gpus-per-node 9 is outside 0..8"),
        (["--gpus-per-node", "8", "--gpu-node-size", "4"], "--gpus-per-node 8 is outside 0..4"),
        (["--name", "Bad_Name"], "--name 'Bad_Name' is not a valid name"),
        (["--name", "a" * 41], "at most 40 characters"),
        (["--namespace", "Team_A"], "--namespace 'Team_A' is not a valid namespace"),
        (["--data", "Bad Claim"], "--data 'Bad Claim' is not a valid PersistentVolumeClaim name"),
        (["--memory", "lots"], "--memory 'lots' is not a Kubernetes quantity"),
        (["--cpus-per-node", "4", "--gpus-per-node", "8"], "--cpus-per-node 4 is fewer than the 8 processes"),
        (["--nodes", "2", "--gpus-per-node", "8", "--set", "train.micro_batch_size=64", "--set", "train.global_batch_size=128"],
         "--set train.global_batch_size=1024"),
        (["--nodes", "2", "--gpus-per-node", "8", "--set", "train.global_batch_size=1024"],
         "--set prepare.shards.max_world_size=16"),
        (["--data", "s3a://bucket/x"], "--checkpoints CLAIM is required"),
        (["--spark-image", ""], "--spark-image is required"),
        (["--set", "train.max_steps=-1"], "train.max_steps must be >= 0"),
    ],
)
def test_impossible_settings_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEQREC_IMAGE", raising=False)
    assert cli_main(["launch", "k8s", *IMAGES, *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqrec launch: error: ") and message in lines[0], lines
    assert out == ""


def test_one_line_error_from_the_console_entry_point() -> None:
    done = run_cli(*IMAGES, "--nodes", "0")  # a fresh interpreter: nothing else reaches stderr
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "seqrec launch: error: --nodes must be >= 1, got 0\n"


def test_images_come_from_flags_or_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEQREC_IMAGE", raising=False)
    monkeypatch.delenv("SEQREC_SPARK_IMAGE", raising=False)
    assert cli_main(["launch", "k8s"]) == 2  # neither flag nor SEQREC_IMAGE
    assert "--image is required" in capsys.readouterr().err
    monkeypatch.setenv("SEQREC_IMAGE", "r/t:1")
    monkeypatch.setenv("SEQREC_SPARK_IMAGE", "r/s:1")
    assert cli_main(["launch", "k8s"]) == 0
    out = capsys.readouterr().out
    assert "image: r/t:1" in out and "image: r/s:1" in out
    monkeypatch.delenv("SEQREC_SPARK_IMAGE")
    assert cli_main(["launch", "k8s", "--component", "train"]) == 0  # no Spark image needed
    out = capsys.readouterr().out
    assert "kind: PyTorchJob" in out and "SparkApplication" not in out


def fake_kubectl(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "kubectl"
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/argv"\ncat > "{tmp_path}/stdin"\n')
    script.chmod(0o755)
    return bin_dir


def test_apply_pipes_manifests_to_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_kubectl(tmp_path)}:{os.environ['PATH']}")
    assert cli_main(["launch", "k8s", *IMAGES, "--apply"]) == 0
    assert (tmp_path / "argv").read_text().split() == ["apply", "-f", "-"]
    applied = [d for d in yaml.safe_load_all((tmp_path / "stdin").read_text()) if d]
    assert applied == list(render(*IMAGES).values())


def test_apply_without_kubectl_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli_main(["launch", "k8s", *IMAGES, "--apply"]) == 2
    assert capsys.readouterr().err.strip() == (
        "seqrec launch: error: --apply needs kubectl on PATH: install it, or write the manifests with --output DIR"
    )


def test_output_folder_is_a_kustomization_without_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli_main(["launch", "k8s", *IMAGES, "--job-kind", "indexed-job", "--output", str(out)]) == 0
    assert (out / "service.yaml").is_file()
    assert cli_main(["launch", "k8s", *IMAGES, "--output", str(out)]) == 0
    assert not (out / "service.yaml").exists()
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in out.iterdir() if p.name != "kustomization.yaml")


# ---------------------------------------------------------------------------------------------------
# The checked-in folders equal the renderer
# ---------------------------------------------------------------------------------------------------


def recorded_command(folder: Path) -> list[str]:
    first = (folder / "kustomization.yaml").read_text().splitlines()[0]
    assert first.startswith("# Generated by: seqrec launch k8s ")
    return shlex.split(first.removeprefix("# Generated by: "))[3:]


@pytest.mark.parametrize("folder", ["base", "indexed-job"])
def test_checked_in_folders_equal_the_renderer(folder: str, tmp_path: Path) -> None:
    here = REPO / "k8s" / folder
    assert cli_main(["launch", "k8s", *recorded_command(here), "--output", str(tmp_path)]) == 0
    stale = f"k8s/{folder} is stale: run k8s/regenerate.sh"
    assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in tmp_path.iterdir()), stale
    for path in tmp_path.iterdir():
        assert (here / path.name).read_text() == path.read_text(), f"{stale} ({path.name} differs)"
    files = {p.name: yaml.safe_load(p.read_text()) for p in here.iterdir() if p.name != "kustomization.yaml"}
    check_all(files, nodes=2, procs=8)


def with_size(argv: list[str], nodes: int) -> list[str]:
    out = list(argv)
    out[out.index("--nodes") + 1] = str(nodes)
    return out


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize(("overlay", "nodes"), [("small", 1), ("large", 16)])
def test_overlays_equal_the_renderer_at_their_size(overlay: str, nodes: int) -> None:
    built = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                           capture_output=True, text=True, check=True, timeout=60)
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    expected = render(*with_size(recorded_command(REPO / "k8s" / "base"), nodes))
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(objects, key=key) == sorted(expected.values(), key=key)
    check_all({"train.yaml": next(o for o in objects if o["kind"] == "PyTorchJob")}, nodes, 8)


# ---------------------------------------------------------------------------------------------------
# The Spark image and the SparkApplication agree
# ---------------------------------------------------------------------------------------------------


def test_spark_image_matches_the_manifest_and_requirements() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile.spark").read_text()
    tag = re.search(r"^ARG SPARK_IMAGE=apache/spark:(\d+\.\d+\.\d+)-\S*python3\S*$", dockerfile, re.M)
    assert tag and tag.group(1) == SPARK_VERSION
    pyspark = re.search(r"^pyspark==(\d+\.\d+)\.\d+$", (REPO / "requirements.txt").read_text(), re.M)
    assert pyspark and SPARK_VERSION.startswith(pyspark.group(1) + ".")
    venv = SPARK_PYTHON.removesuffix("/bin/python")
    assert f"-m venv {venv}" in dockerfile and f"PYSPARK_PYTHON={SPARK_PYTHON}" in dockerfile
