"""Kubernetes manifests for one seqrec run: config, volumes, the Spark prepare job, the training job.

`render(cfg, spec)` returns {file name: object}; the same files make a kustomize folder (k8s/base is
one, written by k8s/regenerate.sh). Training runs `launch/train.sh` in every pod, as a Kubeflow
`PyTorchJob` (the operator sets PET_NNODES/PET_NODE_RANK/MASTER_ADDR) or, without the operator, as an
indexed `batch/v1` Job whose pod 0 is reached through a headless Service (NODE_RANK comes from
JOB_COMPLETION_INDEX). Pods restart on failure and the trainer resumes from its last complete
checkpoint, so a restart costs at most `train.save_every` steps.

The W&B key only ever appears as a `secretKeyRef` to the `wandb` Secret (optional: without it the
run logs offline); nothing here reads WANDB_API_KEY.
"""

from __future__ import annotations

from typing import Any

from seqrec.config import RunConfig
from seqrec.data.schema import MANIFEST_FILE
from seqrec.launch.spec import CHECKPOINT_MOUNT, DATA_MOUNT, ClusterSpec
from seqrec.launch.toml_writer import config_delta, dumps

APP_ROOT = "/opt/seqrec"
"""Where the images keep the project (docker/Dockerfile.train, docker/Dockerfile.spark)."""
CONFIG_DIR = "/etc/seqrec"
CONFIG_KEY = "run.toml"
SPARK_VERSION = "4.0.3"
"""Spark of docker/Dockerfile.spark's base image (a test keeps them equal)."""
SPARK_PYTHON = "/opt/seqrec-venv/bin/python"
"""Python 3.11 environment of the Spark image (the Spark base image's own python3 is 3.10)."""
HADOOP_AWS = "org.apache.hadoop:hadoop-aws:3.4.1"
"""s3a:// support matching the Hadoop 3.4.1 client inside Spark 4.0."""
TRAIN_UID = 1000
"""User of docker/Dockerfile.train."""
SPARK_UID = 185
"""User `spark` of the Apache Spark images."""
FS_GROUP = 1000
"""Group that owns files on the volumes, shared by training and Spark pods."""
PYTORCHJOB_PORT = 23456
"""The operator reads MASTER_PORT from the container port named `pytorchjob-port`."""
RDZV_PORT = 29500
GPU_RESOURCE = "nvidia.com/gpu"
WANDB_SECRET = "wandb"
WANDB_KEY = "WANDB_API_KEY"
S3_SECRET = "s3-credentials"
BACKOFF_PER_NODE = 10
"""Restarts allowed per node: one failure restarts every node, so the job limit is this x nodes."""
SHARDS_WAIT_SECONDS = 6 * 3600
"""How long training pods wait for the prepare job's manifest before failing."""

Obj = dict[str, Any]

_WAIT_FOR_SHARDS = (
    'i=0; until [ -f "$MANIFEST" ]; do '
    'if [ "$i" -ge "$WAIT_SECONDS" ]; then echo "no $MANIFEST after ${WAIT_SECONDS}s: did the prepare job fail?" >&2; exit 1; fi; '
    'if [ "$i" -eq 0 ]; then echo "waiting for $MANIFEST (written last by the prepare job)"; fi; '
    "sleep 10; i=$((i + 10)); done"
)


def render(cfg: RunConfig, spec: ClusterSpec) -> dict[str, Obj]:
    """{file name: manifest} for a cluster config (see `spec.cluster_config`) and a checked spec."""
    files: dict[str, Obj] = {"configmap.yaml": configmap(cfg, spec)}
    if spec.create_pvc:
        files.update({f"pvc-{role}.yaml": pvc(spec, claim) for role, claim in _claims(spec).items()})
    if spec.renders("prepare"):
        files["prepare.yaml"] = spark_application(cfg, spec)
    if spec.renders("train"):
        files.update(TRAIN_JOBS[spec.job_kind](cfg, spec))
    return files


def _claims(spec: ClusterSpec) -> dict[str, str]:
    """{role: claim name} of the volumes this render uses (one claim can serve both roles)."""
    claims = {} if spec.data_is_url else {"data": spec.data}
    if spec.renders("train") and spec.run_mount == CHECKPOINT_MOUNT:
        claims["checkpoints"] = spec.checkpoint_claim
    return claims


def _labels(spec: ClusterSpec, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "seqrec",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
    }


def _meta(spec: ClusterSpec, name: str, component: str) -> Obj:
    return {"name": name, "namespace": spec.namespace, "labels": _labels(spec, component)}


def configmap(cfg: RunConfig, spec: ClusterSpec) -> Obj:
    header = (
        "# seqrec run config rendered by `seqrec launch k8s`: only the values that differ from the\n"
        "# defaults. Relative paths were moved onto the pods' volumes.\n"
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec, f"{spec.name}-config", "config"),
        "data": {CONFIG_KEY: header + dumps(config_delta(cfg))},
    }


def pvc(spec: ClusterSpec, claim: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(spec, claim, "storage"),
        # Every node reads the shards and writes its checkpoint shards: ReadWriteMany (NFS, CephFS,
        # EFS, Filestore). The cluster's default storage class is used.
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": spec.storage}}},
    }


def _volumes(spec: ClusterSpec, *, train: bool) -> tuple[list[Obj], list[Obj]]:
    """(volumes, main-container mounts) shared by training and Spark pods."""
    volumes: list[Obj] = [{"name": "config", "configMap": {"name": f"{spec.name}-config"}}]
    mounts: list[Obj] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    if not spec.data_is_url:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.data}})
        mounts.append({"name": "data", "mountPath": DATA_MOUNT})
    if train and spec.run_mount == CHECKPOINT_MOUNT:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint_claim}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
    return volumes, mounts


def _container_security(uid: int) -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security(uid: int) -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": FS_GROUP,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secret_env(name: str, secret: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def _train_resources(spec: ClusterSpec) -> Obj:
    # requests == limits: Guaranteed QoS (last to be evicted; whole cores under the static CPU manager).
    amounts: Obj = {"cpu": str(spec.cpus), "memory": spec.memory_quantity}
    if spec.gpus_per_node:
        amounts[GPU_RESOURCE] = str(spec.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _wait_for_shards(cfg: RunConfig, spec: ClusterSpec) -> Obj:
    small = {"cpu": "100m", "memory": "64Mi"}
    return {
        "name": "wait-for-shards",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", _WAIT_FOR_SHARDS],
        "env": [
            {"name": "MANIFEST", "value": f"{cfg.data.path.rstrip('/')}/{MANIFEST_FILE}"},
            {"name": "WAIT_SECONDS", "value": str(SHARDS_WAIT_SECONDS)},
        ],
        "resources": {"requests": dict(small), "limits": dict(small)},
        "securityContext": {**_container_security(TRAIN_UID), "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT, "readOnly": True}],
    }


def train_pod_template(cfg: RunConfig, spec: ClusterSpec, *, container: str, port: Obj, env: list[Obj]) -> Obj:
    """The pod every training node runs: `launch/train.sh --config <ConfigMap file>`."""
    volumes, mounts = _volumes(spec, train=True)
    # Memory-backed /dev/shm (the runtime default is 64Mi) for NCCL and loader workers; a writable
    # /tmp as HOME (caches of torch, DeepSpeed, W&B) under a read-only root file system.
    volumes += [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts += [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    main = {
        "name": container,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [f"{APP_ROOT}/launch/train.sh"],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
            *env,
            _secret_env(WANDB_KEY, WANDB_SECRET, WANDB_KEY),
        ],
        "ports": [port],
        "resources": _train_resources(spec),
        "securityContext": {**_container_security(TRAIN_UID), "readOnlyRootFilesystem": True},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    pod: Obj = {
        "restartPolicy": "OnFailure",
        "enableServiceLinks": False,
        "securityContext": _pod_security(TRAIN_UID),
    }
    if cfg.data.path.startswith(DATA_MOUNT + "/") and not spec.data_is_url:
        pod["initContainers"] = [_wait_for_shards(cfg, spec)]
    pod["containers"] = [main]
    pod["volumes"] = volumes
    if spec.gpus_per_node:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": _labels(spec, "train")}, "spec": pod}


def pytorchjob(cfg: RunConfig, spec: ClusterSpec) -> dict[str, Obj]:
    """Kubeflow training-operator PyTorchJob: one Master and nodes-1 Workers, same pod."""
    port = {"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}
    # The operator injects MASTER_ADDR/MASTER_PORT and PET_NNODES/PET_NODE_RANK/PET_NPROC_PER_NODE.
    template = train_pod_template(cfg, spec, container="pytorch", port=port, env=[])
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(spec, spec.name, "train"),
        "spec": {
            "nprocPerNode": str(spec.procs_per_node),
            "runPolicy": {"backoffLimit": BACKOFF_PER_NODE * spec.nodes, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }
    return {"train.yaml": job}


def indexed_job(cfg: RunConfig, spec: ClusterSpec) -> dict[str, Obj]:
    """batch/v1 Job with one pod per node (completion index = node rank) and a headless Service."""
    port = {"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}
    env = [
        {"name": "NNODES", "value": str(spec.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(spec.procs_per_node)},
        # Pod 0's stable name through the headless Service (hostname <job>-<index>, subdomain <svc>).
        {"name": "MASTER_ADDR", "value": f"{spec.name}-0.{spec.name}"},
        {"name": "MASTER_PORT", "value": str(RDZV_PORT)},
        {"name": "RDZV_ID", "value": spec.name},
    ]
    template = train_pod_template(cfg, spec, container="train", port=port, env=env)
    template["spec"]["subdomain"] = spec.name
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(spec, spec.name, "train"),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            "backoffLimit": BACKOFF_PER_NODE * spec.nodes,
            "template": template,
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec, spec.name, "train"),
        "spec": {
            "clusterIP": "None",
            # DNS records before readiness: the other nodes look up pod 0 while it starts.
            "publishNotReadyAddresses": True,
            "selector": _labels(spec, "train"),
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }
    return {"service.yaml": service, "train.yaml": job}


TRAIN_JOBS = {"pytorchjob": pytorchjob, "indexed-job": indexed_job}


def _spark_pod(spec: ClusterSpec, mounts: list[Obj], env: list[Obj]) -> Obj:
    pod: Obj = {
        "labels": _labels(spec, "prepare"),
        "podSecurityContext": _pod_security(SPARK_UID),
        "securityContext": _container_security(SPARK_UID),
        "volumeMounts": mounts,
    }
    if env:
        pod["env"] = env
    return pod


def spark_application(cfg: RunConfig, spec: ClusterSpec) -> Obj:
    """Spark operator SparkApplication running spark_jobs/build_sequences.py on the run config."""
    volumes, mounts = _volumes(spec, train=False)
    conf = {"spark.pyspark.python": SPARK_PYTHON, "spark.pyspark.driver.python": SPARK_PYTHON}
    env: list[Obj] = []
    app: Obj = {}
    if spec.data.startswith("s3a://"):
        # hadoop-aws is fetched at submit time into a writable ivy folder; credentials come from an
        # optional Secret (leave it out where pods get a cloud role, e.g. IRSA or workload identity).
        app["deps"] = {"packages": [HADOOP_AWS]}
        conf["spark.jars.ivy"] = "/tmp/.ivy2"
        env = [_secret_env(k, S3_SECRET, k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    driver = {
        "cores": 1,
        "memory": cfg.prepare.spark_driver_memory,
        "serviceAccount": spec.spark_service_account,
        **_spark_pod(spec, mounts, env),
    }
    executor = {
        "instances": spec.executors,
        "cores": spec.executor_cores,
        "memory": spec.executor_memory,
        **_spark_pod(spec, mounts, env),
    }
    return {
        "apiVersion": "sparkoperator.k8s.io/v1beta2",
        "kind": "SparkApplication",
        "metadata": _meta(spec, f"{spec.name}-prepare", "prepare"),
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": spec.spark_image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": f"local://{APP_ROOT}/spark_jobs/build_sequences.py",
            "arguments": ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
            "sparkVersion": SPARK_VERSION,
            "sparkConf": conf,
            **app,
            "restartPolicy": {
                "type": "OnFailure",
                "onFailureRetries": 2,
                "onFailureRetryInterval": 60,
                "onSubmissionFailureRetries": 3,
                "onSubmissionFailureRetryInterval": 30,
            },
            "volumes": volumes,
            "driver": driver,
            "executor": executor,
        },
    }
