"""The SparkSession used by `seqrec prepare` and the tests, and the runtime settings every job needs.

`get_spark` builds an embedded session (local[N] by default); `configure` applies the settings the
job relies on to any session, including one that `spark-submit` created against a cluster master:
UTC session time zone (timestamps parse the same everywhere), no adaptive partition coalescing
(shard and shuffle partition counts stay exactly as asked), Arrow for pandas conversions.
"""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

RUNTIME_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.adaptive.coalescePartitions.enabled": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "65536",  # fewer, larger blocks for the Python passes
}
"""SQL settings the job sets on every session it runs in (all of them can change at runtime)."""


def _set_env_defaults() -> None:
    # Without these, Spark may bind to an unreachable interface and start workers with a `python3`
    # that lacks the venv's packages (DEPENDENCIES.md).
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def get_spark(
    master: str = "local[*]",
    driver_memory: str = "4g",
    shuffle_partitions: int = 8,
    app_name: str = "seqrec-prepare",
) -> SparkSession:
    """An embedded SparkSession with quiet logs and the job's runtime settings.

    Example:
        spark = get_spark("local[2]", "2g", 4, "seqrec-tests")
    """
    _set_env_defaults()
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.ui.enabled", "false")  # no port to bind; several local sessions can coexist
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in RUNTIME_CONF.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # no INFO line per connection, even at exit
    return spark


def configure(spark: SparkSession, shuffle_partitions: int) -> None:
    """Apply the job's runtime settings to a session it did not create (spark-submit, tests)."""
    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions))
    for key, value in RUNTIME_CONF.items():
        spark.conf.set(key, value)
