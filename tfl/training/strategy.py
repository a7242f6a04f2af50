"""Which tf.distribute strategy to train under, and which worker this process is.

The trainer only ever talks to the strategy it is given. Make the strategy first in a process: logical devices
(--devices) and the multi-worker cluster can only be set up before TensorFlow initialises its devices.
TensorFlow is imported inside the functions so that the CLI can import StrategyUnavailableError cheaply.
"""

from __future__ import annotations

from tfl.errors import Unavailable, UsageError
import json
import logging
import os

from tfl.options import STRATEGIES as CHOICES
from tfl.training import stopping


class StrategyUnavailableError(Unavailable):
    """The machine cannot provide the strategy asked for (no TPU reachable): the environment, not the command."""


def make_strategy(name: str = "auto", devices: int | None = None, worker_hosts: tuple[str, ...] = (),
                  task_index: int | None = None):
    """The strategy `name`; `devices` replicas on this machine; `worker_hosts`/`task_index` write TF_CONFIG."""
    if name not in CHOICES:
        raise UsageError(f"unknown strategy {name!r}; choose one of {', '.join(CHOICES)}")
    if devices is not None and devices < 1:
        raise UsageError(f"--devices {devices}: must be at least 1")
    tf_config = os.environ.get("TF_CONFIG")
    if worker_hosts:
        if name not in ("auto", "multi_worker"):
            raise UsageError(f"--worker-hosts starts a multi-worker run; it does not go with --strategy {name}")
        tf_config = worker_tf_config(worker_hosts, task_index)
    elif task_index is not None:
        raise UsageError("--task-index goes with --worker-hosts (the list of every worker's host:port)")
    workers = _cluster_size(tf_config)
    if name == "auto":
        name = "multi_worker" if workers > 1 else "mirrored" if (devices or 0) > 1 or _gpu_count() > 1 else "default"
    if name in ("default", "one_device", "tpu") and (devices or 1) > 1:
        raise UsageError(f"--devices {devices} needs --strategy mirrored (or auto); {name} uses one device")
    if name == "multi_worker" and workers == 0:
        raise UsageError("--strategy multi_worker needs the cluster: set TF_CONFIG, or pass --worker-hosts "
                         "host:port,host:port (every worker, chief first) and --task-index I on each worker")

    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if _gpu_count() else "/cpu:0")
    if name == "mirrored":
        return _mirrored(tf, _local_devices(devices) if devices else None)
    if name == "multi_worker":
        if devices:
            if not _gpu_count() and devices > 1:
                raise UsageError(f"--devices {devices}: on CPU a multi-worker run has one replica per worker; "
                                 "start more workers instead")
            _local_devices(devices)
        os.environ["TF_CONFIG"] = tf_config  # MultiWorkerMirroredStrategy reads the cluster from here
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        stopping.reclaim()  # SIGTERM stops a worker as it stops one process (tfl.training.stopping)
        return strategy
    return _tpu_strategy(tf)


def worker_tf_config(worker_hosts, task_index: int | None) -> str:
    """TF_CONFIG for worker `task_index` of a cluster of plain workers; worker 0 is the chief."""
    hosts = [h.strip() for h in worker_hosts if h.strip()]
    for host in hosts:
        _, _, port = host.rpartition(":")
        if not port.isdigit():
            raise UsageError(f"--worker-hosts: {host!r} is not host:port (e.g. localhost:12345)")
    if task_index is None:
        raise UsageError(f"--worker-hosts needs --task-index: this worker's position in --worker-hosts, "
                         f"0..{len(hosts) - 1} (0 is the chief)")
    if not 0 <= task_index < len(hosts):
        raise UsageError(f"--task-index {task_index}: give this worker's position in --worker-hosts, which lists "
                         f"{len(hosts)} worker(s): 0..{len(hosts) - 1} (0 is the chief)")
    if "TF_CONFIG" in os.environ:
        raise UsageError("both TF_CONFIG and --worker-hosts are set; use one of them")
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": task_index}})


def is_chief(strategy) -> bool:
    """True for the one process that writes the run directory: the chief, else worker 0, else a lone process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def worker_name(strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    return f"{resolver.task_type}{resolver.task_id}" if resolver is not None and resolver.task_type else "worker0"


def check_workers_agree(strategy, value: int, what: str) -> None:
    """Raise unless every worker of a multi-worker run holds the same `value`: workers that disagree (e.g. on
    the epoch to resume from) would meet in different collectives and hang or silently diverge."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    values = strategy.gather(strategy.run(lambda: tf.constant([value], tf.int64)), axis=0).numpy().tolist()
    if len(set(values)) > 1:
        raise UsageError(f"the workers disagree on {what} (one value per replica: {values})")


def chief_value(strategy, value: int) -> int:
    """The chief's `value` on every worker of a multi-worker run (each worker's own elsewhere)."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return value
    values = strategy.gather(strategy.run(lambda: tf.constant([value], tf.int64)), axis=0).numpy().tolist()
    return int(values[0])


TF_CONFIG_FORM = ('{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}} (every '
                  'worker\'s host:port, chief first; I this worker\'s position in that list)')
CLUSTER_JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains on


def _cluster_size(tf_config: str | None) -> int:
    """The number of training tasks (chief and workers) in `tf_config`, after checking all of it that TensorFlow
    reads: a TF_CONFIG it would refuse with a TypeError or its own wording is refused here with one line."""
    if not tf_config or not tf_config.strip():
        return 0
    try:
        config = json.loads(tf_config)
    except ValueError as err:
        raise _bad_tf_config(f"it is not JSON ({err})", tf_config) from None
    if not isinstance(config, dict):
        raise _bad_tf_config(f"it is a JSON {type(config).__name__}, not an object", tf_config)
    if not config:  # {}: no cluster at all, as TensorFlow reads it
        return 0
    cluster = config.get("cluster")
    if cluster is None:
        raise _bad_tf_config('it has no "cluster"', tf_config)
    if not isinstance(cluster, dict):
        raise _bad_tf_config(f'"cluster" is {_json(cluster)}, not an object of lists', tf_config)
    for job, tasks in cluster.items():
        if not isinstance(tasks, list):
            raise _bad_tf_config(f'"cluster"\'s {job!r} is {_json(tasks)}, not a list of host:port strings',
                                 tf_config)
        for address in tasks:
            if not isinstance(address, str) or not _is_host_port(address):
                raise _bad_tf_config(f'"cluster"\'s {job!r} lists {_json(address)}, not a host:port string',
                                     tf_config)
    size = sum(len(cluster.get(job, [])) for job in CLUSTER_JOBS)
    task = config.get("task")
    if task is None:
        if size > 1:
            raise _bad_tf_config('it has a cluster but no "task" saying which of its workers this process is',
                                 tf_config)
        return size
    if not isinstance(task, dict):
        raise _bad_tf_config(f'"task" is {_json(task)}, not an object', tf_config)
    kind, index = task.get("type"), task.get("index")
    if not isinstance(kind, str):
        raise _bad_tf_config(f'"task"\'s "type" is {_json(kind)}, not a string such as "worker"', tf_config)
    if kind not in cluster:
        raise _bad_tf_config(f'"task"\'s "type" {kind!r} is not in "cluster", which has '
                             f'{", ".join(map(repr, cluster)) or "no jobs"}', tf_config)
    if not isinstance(index, int) or isinstance(index, bool):
        raise _bad_tf_config(f'"task"\'s "index" is {_json(index)}, not an integer', tf_config)
    count = len(cluster[kind])
    if not count:
        raise _bad_tf_config(f'"cluster"\'s {kind!r} list is empty', tf_config)
    if not 0 <= index < count:
        raise UsageError(f"TF_CONFIG: task index {index} is beyond its {kind} list, which has {count} "
                         f"{kind}(s) (indices 0..{count - 1}); set \"index\" to this process's position in "
                         f"\"cluster\"'s {kind!r} list")
    return size


def _is_host_port(address: str) -> bool:
    host, colon, port = address.rpartition(":")
    return bool(host and colon and port.isdigit())


def _bad_tf_config(what: str, tf_config: str) -> UsageError:
    return UsageError(f"TF_CONFIG: {what}; expected the form {TF_CONFIG_FORM}; it is {tf_config[:200]!r}")


def _json(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def _local_devices(n: int) -> list[str]:
    """The first n GPUs, or (no GPU) the CPU split into n logical devices, so replicas really run apart."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    try:
        if gpus:
            if n > len(gpus):
                raise UsageError(f"--devices {n}: this machine has only {len(gpus)} GPU(s)")
            tf.config.set_visible_devices(gpus[:n], "GPU")
            return [f"/gpu:{i}" for i in range(n)]
        _warn_above_cores(n)
        cpu = tf.config.list_physical_devices("CPU")[0]
        if len(tf.config.get_logical_device_configuration(cpu) or [None]) != n:  # (listing would initialise)
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        return [f"/cpu:{i}" for i in range(n)]
    except RuntimeError:  # TensorFlow already initialised its devices in this process
        raise UsageError(f"--devices {n}: TensorFlow's devices are already initialised in this process; "
                         "choose the devices before anything else runs TensorFlow (a fresh process)") from None


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's limit), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _warn_above_cores(replicas: int) -> None:
    """Warn when logical CPU replicas outnumber the cores. Not refused: replicas on one CPU are how a multi-GPU
    run's numbers are reproduced on a laptop (the tests do it), and no count is wrong in itself; but every replica
    runs its own copy of each step and holds its own buffers, so past the cores a run is only slower and larger."""
    cores = cpu_cores()
    if replicas > cores:
        logging.getLogger("tfl").warning(
            f"warning: --devices {replicas} splits the CPU into {replicas} replicas but this process has {cores} "
            f"core(s); each replica runs its own copy of every step and holds its own memory, so the run will be "
            f"slower and larger than with --devices {cores} or fewer")


# One MirroredStrategy per device list for the whole process. Recipes that run several jobs one after another
# (dann, multitask, pretext, compare, ...) ask for the strategy once per job; a second MirroredStrategy over the
# same devices restarts the collective keys, so its all-reduces meet the first one's cached collective instances
# and fail as soon as the gradients have another size ("Shape mismatch in the collective instance 100",
# tensorflow/tensorflow#62790) -- or silently reuse them when the sizes happen to agree.
_MIRRORED: dict = {}


def _mirrored(tf, devices: list[str] | None):
    key = tuple(devices) if devices else None
    if key not in _MIRRORED:
        _MIRRORED[key] = tf.distribute.MirroredStrategy(devices)
    return _MIRRORED[key]


def _tpu_strategy(tf):
    tpu = os.environ.get("TPU_NAME", "local")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as err:  # TF raises NotFoundError, ValueError or RPC errors depending on what is missing
        reason = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise StrategyUnavailableError(
            f"--strategy tpu: no TPU reachable as {tpu!r} ({reason}); set TPU_NAME to the TPU's name or "
            "grpc:// address, or pick another --strategy") from None
    return tf.distribute.TPUStrategy(resolver)
