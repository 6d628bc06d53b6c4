"""What a cluster run asks for (`ClusterSpec`), its checks, and the run config as the pods see it.

A `ClusterSpec` is the hardware and placement side (nodes, GPUs, images, volumes); the `RunConfig` is
the math. `check` rejects settings that cannot work before anything reaches a cluster: zero nodes, a
missing image, more GPUs per node than a node has, names Kubernetes refuses, a global batch that the
world size does not divide, shards laid out for fewer ranks than will read them. Each failure is one
`LaunchError` line (a `ConfigError`, so the CLI exits 2). `cluster_config` moves the config's relative
paths onto the mounted volumes (or under an object-store prefix).
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Literal

from seqrec.config import ConfigError, RunConfig, ShardConfig, TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)

JobKind = Literal["pytorchjob", "indexed-job"]
Component = Literal["all", "prepare", "train"]

DATA_MOUNT = "/workspace"
"""Where the data volume is mounted in every pod: it plays the repository root, so relative paths
such as data/demo/shards and runs/demo keep their layout on the volume."""
CHECKPOINT_MOUNT = "/checkpoints"
"""Where a separate checkpoint volume is mounted in training pods."""
CPU_PROCS_PER_NODE = 2
"""Training processes per node without GPUs (the same default as launch/train.sh)."""
MAX_NAME_LEN = 40
"""Longest --name: pod names add suffixes such as `-worker-15` and `-prepare-driver` (limit 63)."""

# Config paths that hold data (rebased onto the data volume or prefix) and the run folder.
DATA_PATH_KEYS = (
    "prepare.input.path",
    "prepare.input.item_features_path",
    "prepare.output",
    "prepare.reuse_vocab",
    "data.path",
)
RUN_PATH_KEYS = ("run_dir",)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_K8S_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_JVM_MEMORY = re.compile(r"^[1-9][0-9]*([kmgtp]b?)?$", re.IGNORECASE)
_QUANTITY_FACTORS = {
    None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


class LaunchError(ConfigError):
    """A cluster setting that cannot work; reported as one line, exit code 2."""


@dataclass(kw_only=True, slots=True)
class ClusterSpec:
    """Hardware, images and placement of one cluster run (the CLI flags of `seqrec launch k8s`)."""

    name: str
    """Name of every object (DNS-1123 label, at most 40 characters)."""
    image: str
    """Training image (docker/Dockerfile.train)."""
    spark_image: str = ""
    """Spark image (docker/Dockerfile.spark); needed when the prepare job is rendered."""
    namespace: str = "default"
    """Kubernetes namespace."""
    nodes: int = 1
    """Training nodes (pods)."""
    gpus_per_node: int = 1
    """GPUs per training pod (0: CPU processes on the gloo backend)."""
    gpu_node_size: int = 8
    """GPUs one node of the cluster has; a pod cannot ask for more."""
    cpus_per_node: int | None = None
    """CPU cores per training pod (None: 8 per GPU, or 4 without GPUs)."""
    memory: str | None = None
    """Memory per training pod as a Kubernetes quantity (None: 32Gi per GPU, or 16Gi without GPUs)."""
    data: str = "seqrec-data"
    """PersistentVolumeClaim with data and shards, or an object-store URL (s3a://bucket/prefix)."""
    checkpoints: str = ""
    """PersistentVolumeClaim for run folders (empty: the data claim)."""
    job_kind: JobKind = "pytorchjob"
    """Kubeflow PyTorchJob, or an indexed batch/v1 Job with a headless Service (no operator needed)."""
    component: Component = "all"
    """Which stages to render: the prepare SparkApplication, the training job, or both."""
    create_pvc: bool = True
    """Render PersistentVolumeClaim objects for the claims (off: they exist already)."""
    storage: str = "100Gi"
    """Size of each rendered claim."""
    executors: int = 2
    """Spark executors."""
    executor_cores: int = 2
    """Cores per Spark executor."""
    executor_memory: str = "4g"
    """Heap per Spark executor (JVM size: 512m, 4g)."""
    spark_service_account: str = "spark-operator-spark"
    """Service account of the Spark driver (allowed to create executor pods)."""

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else CPU_PROCS_PER_NODE

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def data_is_url(self) -> bool:
        return "://" in self.data

    @property
    def checkpoint_claim(self) -> str:
        return self.checkpoints or ("" if self.data_is_url else self.data)

    @property
    def run_mount(self) -> str:
        """Where the run folder's volume is mounted: the data volume when both are one claim."""
        return DATA_MOUNT if self.checkpoint_claim == self.data else CHECKPOINT_MOUNT

    @property
    def cpus(self) -> int:
        if self.cpus_per_node is not None:
            return self.cpus_per_node
        return 8 * self.gpus_per_node if self.gpus_per_node > 0 else 4

    @property
    def memory_quantity(self) -> str:
        if self.memory is not None:
            return self.memory
        return f"{32 * self.gpus_per_node}Gi" if self.gpus_per_node > 0 else "16Gi"

    @property
    def shm_size(self) -> str:
        """/dev/shm for NCCL and loader workers: a quarter of the pod's memory (memory-backed, so
        it counts against the limit only when used), at least 64Mi."""
        mib = max(64, quantity_bytes(self.memory_quantity, "--memory") // 4 // 2**20)
        return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"

    def renders(self, stage: Literal["prepare", "train"]) -> bool:
        return self.component in ("all", stage)


def quantity_bytes(text: str, what: str) -> int:
    """Bytes in a Kubernetes quantity such as 64Gi or 500M; LaunchError naming `what` otherwise."""
    match = _K8S_QUANTITY.match(text)
    if not match:
        raise LaunchError(f"{what} {text!r} is not a Kubernetes quantity (e.g. 64Gi, 512Mi, 100G)")
    return int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])


def check(spec: ClusterSpec) -> None:
    """Raise LaunchError for the first setting that cannot work."""
    _check_names(spec)
    _check_sizes(spec)
    for flag, image in (("--image", spec.image), ("--spark-image", spec.spark_image)):
        if flag == "--spark-image" and not spec.renders("prepare"):
            continue
        if not image.strip():
            raise LaunchError(f"{flag} is required: the image to run (see docker/ and docs/cluster.md)")
        if any(c.isspace() for c in image):
            raise LaunchError(f"{flag} {image!r} contains whitespace")
        if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
            log.warning("%s %s has no tag: pin one so that every node runs the same build", flag, image)


def _check_names(spec: ClusterSpec) -> None:
    if not _DNS_LABEL.match(spec.name) or len(spec.name) > MAX_NAME_LEN:
        raise LaunchError(
            f"--name {spec.name!r} is not a valid name: lowercase letters, digits and '-', starting and "
            f"ending with a letter or digit, at most {MAX_NAME_LEN} characters"
        )
    if not _DNS_LABEL.match(spec.namespace) or len(spec.namespace) > 63:
        raise LaunchError(f"--namespace {spec.namespace!r} is not a valid namespace (DNS-1123 label)")
    if spec.data_is_url:
        if not _URL.match(spec.data):
            raise LaunchError(f"--data {spec.data!r} is neither a claim name nor a URL like s3a://bucket/prefix")
        if not spec.checkpoints and spec.renders("train"):
            raise LaunchError("--checkpoints CLAIM is required when --data is a URL: checkpoints need a file system")
    for flag, claim in (("--data", "" if spec.data_is_url else spec.data), ("--checkpoints", spec.checkpoints)):
        if claim and (not _DNS_SUBDOMAIN.match(claim) or len(claim) > 253):
            raise LaunchError(f"{flag} {claim!r} is not a valid PersistentVolumeClaim name (DNS-1123 subdomain)")
    if not _DNS_SUBDOMAIN.match(spec.spark_service_account):
        raise LaunchError(f"--spark-service-account {spec.spark_service_account!r} is not a valid name")


def _check_sizes(spec: ClusterSpec) -> None:
    if spec.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.gpu_node_size < 1:
        raise LaunchError(f"--gpu-node-size must be >= 1, got {spec.gpu_node_size}")
    if not 0 <= spec.gpus_per_node <= spec.gpu_node_size:
        raise LaunchError(
            f"--gpus-per-node {spec.gpus_per_node} is outside 0..{spec.gpu_node_size} (--gpu-node-size, "
            "the GPUs one node has): use more --nodes instead"
        )
    if spec.cpus < spec.procs_per_node:
        raise LaunchError(f"--cpus-per-node {spec.cpus} is fewer than the {spec.procs_per_node} processes per node")
    if quantity_bytes(spec.memory_quantity, "--memory") < 2**30:
        raise LaunchError(f"--memory {spec.memory_quantity} is below 1Gi: too little for a training process")
    quantity_bytes(spec.storage, "--storage")
    if spec.executors < 1 or spec.executor_cores < 1:
        raise LaunchError("--executors and --executor-cores must be >= 1")
    if not _JVM_MEMORY.match(spec.executor_memory):
        raise LaunchError(f"--executor-memory {spec.executor_memory!r} is not a JVM size such as 512m or 4g")


def check_fits(train: TrainConfig, shards: ShardConfig, world: int, layout: str) -> None:
    """The global batch must split evenly over `world` ranks; the shards must feed every rank.
    Batch sizes left at 0 are derived at start-up for the actual world size (seqrec/recipe.py)."""
    per_step = train.micro_batch_size * world
    if per_step and train.global_batch_size and train.global_batch_size % per_step:
        fixed = -(-train.global_batch_size // per_step) * per_step
        raise LaunchError(
            f"train.global_batch_size ({train.global_batch_size}) is not a multiple of train.micro_batch_size "
            f"({train.micro_batch_size}) x {world} processes ({layout}) = {per_step}: "
            f"--set train.global_batch_size={fixed}, or lower train.micro_batch_size"
        )
    if shards.max_world_size < world:
        raise LaunchError(
            f"prepare.shards.max_world_size ({shards.max_world_size}) is below the {world} training processes "
            f"({layout}), so some ranks would get no shard: --set prepare.shards.max_world_size={world}"
        )


def cluster_config(cfg: RunConfig, spec: ClusterSpec) -> RunConfig:
    """`cfg` with relative data paths under the data volume (or URL) and the run folder on its volume.

    Absolute paths and URLs are kept as they are: they name a place the user chose.
    """
    data_root = spec.data.rstrip("/") if spec.data_is_url else DATA_MOUNT
    values = to_dict(cfg)
    for key in DATA_PATH_KEYS:
        _set(values, key, _rebase(_get(values, key), data_root))
    for key in RUN_PATH_KEYS:
        _set(values, key, _rebase(_get(values, key), spec.run_mount))
    for key in DATA_PATH_KEYS + RUN_PATH_KEYS:
        path = _get(values, key)
        if path.startswith("/") and not _under_mount(path, spec):
            log.warning("%s = %s is not on a mounted volume: the pods may not see it", key, path)
    return from_dict(values, source="cluster config")


def _rebase(path: str, root: str) -> str:
    if not path or "://" in path or path.startswith("/"):
        return path
    return f"{root}/{posixpath.normpath(path)}"


def _under_mount(path: str, spec: ClusterSpec) -> bool:
    mounts = [spec.run_mount] + ([] if spec.data_is_url else [DATA_MOUNT])
    return any(path == m or path.startswith(m + "/") for m in mounts)


def _get(values: dict, key: str) -> str:
    node = values
    for part in key.split("."):
        node = node[part]
    return node  # type: ignore[return-value]


def _set(values: dict, key: str, value: str) -> None:
    *parents, last = key.split(".")
    node = values
    for part in parents:
        node = node[part]
    node[last] = value
