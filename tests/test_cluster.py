"""cluster/: the launcher configs, manifests and scripts, each checked by the
tool that reads it (Ray's `ray up` validation, Accelerate's launcher, bash).
tests/test_cluster_runs.py runs searches on real two-node Ray clusters."""
import configparser
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ("aws", "gcp")
ACCELERATE_CONFIGS = ("one_node", "multi_node")
SLURM_SCRIPTS = ("tune.sbatch", "accelerate.sbatch")
IMAGE_WORKDIR = "/home/ray/daae"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def pinned_ray_version() -> str:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    (pin,) = re.findall(r"ray\[[^\]]*\]==([\w.]+)", setup["options.extras_require"]["tune"])
    return pin


def search_bundles() -> dict:
    """What one node must hold for each shipped search: a whole trial, or one
    distributed worker of it (tune.runner.check_cluster's rule)."""
    from tune import load_search

    bundles = {}
    for path in sorted((ROOT / "configs" / "tune").glob("*.yaml")):
        r = load_search(path).file.resources
        bundles[path.name] = (r.cpu / r.num_workers, r.gpu / r.num_workers)
    return bundles


def fits(bundle, cpu, gpu) -> bool:
    return cpu >= bundle[0] and gpu >= bundle[1]


# ------------------------------------------------------------------ launcher configs

def prepared(name: str) -> dict:
    """The config as `ray up` validates it: defaults filled in, then Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(CLUSTER / f"{name}.yaml"))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_validates_like_ray_up(name):
    config = prepared(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2  # single-GPU trials and multi-GPU trials
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0 < node_type["max_workers"]  # the autoscaler adds them
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())
    # Every shipped search fits at least one GPU worker type.
    for search, bundle in search_bundles().items():
        assert any(fits(bundle, t["resources"]["CPU"], t["resources"]["GPU"])
                   for t in gpu_types.values()), (name, search)


def test_ray_up_validation_rejects_a_broken_config():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "aws.yaml")
    config["available_node_types"]["gpu_1x"]["resource"] = config["available_node_types"][
        "gpu_1x"].pop("resources")
    with pytest.raises(ValidationError, match="resource"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_install_daae_from_the_synced_checkout(name):
    config = prepared(name)
    # What `pip install -e .` reads: the packages setup.cfg lists, its
    # metadata files and the long description; and the search configs.
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(ROOT / "setup.cfg")
    needed = {"setup.cfg", "pyproject.toml", "configs",
              setup_cfg["metadata"]["long_description"].removeprefix("file:").strip(),
              *setup_cfg["options.packages.find"]["include"].split()}
    needed = {n for n in needed if "*" not in n}
    mounts = {local.removeprefix("./"): remote for remote, local in config["file_mounts"].items()}
    assert needed <= set(mounts), needed - set(mounts)
    roots = {remote.removesuffix(f"/{local}") for local, remote in mounts.items()}
    assert len(roots) == 1  # one checkout on the node
    (remote,) = roots
    for local in mounts:
        assert (ROOT / local).exists(), local
    setup = config["setup_commands"]
    assert any(re.search(rf"cd {re.escape(remote)} && .*pip install .*-e '\.\[tune\]'", c)
               for c in setup), setup
    commands = [*config["initialization_commands"], *setup, *config["head_setup_commands"],
                *config["worker_setup_commands"], *config["head_start_ray_commands"],
                *config["worker_start_ray_commands"]]
    commands += [c for t in config["available_node_types"].values()
                 for c in t.get("initialization_commands", [])]
    for command in commands:
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)


def test_gcp_node_types_state_what_their_machines_have():
    # GCP reports nothing to Ray: the declared resources are all it knows.
    config = prepared("gcp")
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        gpus = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
        assert node_type["resources"].get("GPU", 0) == gpus, name
        if name != config["head_node_type"]:
            assert node_type["resources"]["CPU"] == int(node["machineType"].rsplit("-", 1)[1]), name
        if gpus:
            assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"], name
            items = {i["key"]: i["value"] for i in node["metadata"]["items"]}
            assert items["install-nvidia-driver"] == "True", name
            assert "cloud-platform" in node["serviceAccounts"][0]["scopes"][0], name


def test_aws_node_types_state_what_their_instances_have():
    # Per AWS's instance type table; Ray would detect these, the test keeps
    # the declared numbers honest when an instance type changes.
    instances = {"g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4)}
    config = prepared("aws")
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        cpu, gpu = instances[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"] == {"CPU": cpu, "GPU": gpu}, name
        assert "IamInstanceProfile" in node_type["node_config"], name  # workers write to S3


def test_aws_nodes_name_their_image_so_ray_never_picks_its_ubuntu_18_default():
    # Ray's default AMI (Ubuntu 18.04, glibc 2.27) cannot install the pinned
    # torch wheels; every node type names the one image the README looks up.
    images = {name: node_type["node_config"].get("ImageId", "")
              for name, node_type in prepared("aws")["available_node_types"].items()}
    assert len(set(images.values())) == 1, images  # the head installs the same way
    assert all(image and image.lower() != "latest_dlami" for image in images.values()), images
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in (CLUSTER / "aws.yaml").read_text()


# ------------------------------------------------------------------------- KubeRay

def pods(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_kuberay_manifests_hold_a_gpu_cluster_on_shared_storage():
    storage = load(CLUSTER / "kuberay" / "storage.yaml")
    cluster = load(CLUSTER / "kuberay" / "raycluster.yaml")
    job = load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (storage["kind"], cluster["kind"], job["kind"]) == (
        "PersistentVolumeClaim", "RayCluster", "RayJob")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert storage["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes trials
    spec = cluster["spec"]
    # The RayJob starts the very same cluster.
    assert job["spec"]["rayClusterSpec"] == spec
    # Ray refuses nodes of another version: image, manifest, setup.cfg and
    # this environment agree.
    import ray

    version = pinned_ray_version()
    assert spec["rayVersion"] == version == ray.__version__
    (base,) = re.findall(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base.startswith(f"rayproject/ray:{version}-")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    images, mounts = set(), set()
    for pod in pods(spec):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            images.add(container["image"])
            mounts |= {(claims[m["name"]], m["mountPath"]) for m in container["volumeMounts"]
                       if m["name"] in claims}
    assert len(images) == 1
    assert mounts == {(storage["metadata"]["name"], "/mnt/shared")}
    gpu_groups = {}
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits == container["resources"]["requests"]
        gpu_groups[group["groupName"]] = (float(limits["cpu"]), limits.get("nvidia.com/gpu", 0))
    assert sum(gpu > 0 for _, gpu in gpu_groups.values()) >= 2
    for search, bundle in search_bundles().items():
        assert any(fits(bundle, cpu, gpu) for cpu, gpu in gpu_groups.values()), search


def test_rayjob_entrypoint_is_a_valid_search_on_the_shared_volume(tmp_path):
    from tune import load_search
    from tune.cli import build_parser

    entrypoint = shlex.split(load(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"])
    assert entrypoint[:2] == ["daae", "tune"]
    args = build_parser().parse_args(entrypoint[2:])
    # The Dockerfile copies this checkout to IMAGE_WORKDIR.
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", (CLUSTER / "Dockerfile").read_text(), re.M)
    config = Path(args.config)
    assert config.is_relative_to(IMAGE_WORKDIR)
    spec = load_search(ROOT / config.relative_to(IMAGE_WORKDIR), args.overrides)
    assert spec.file.storage_path.startswith("/mnt/shared/")
    assert args.no_resource_check  # the GPU groups start at zero replicas


# ---------------------------------------------------------------------- Accelerate

def torchrun_config(config_file: Path, *options: str):
    """What `accelerate launch --config_file ... -m daae train` hands to
    torchrun, computed by Accelerate's own launcher code (no GPU needed)."""
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import (_filter_args, _validate_launch_command,
                                            launch_command_parser)
    from accelerate.utils import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config_file), *options, "-m", "daae", "train", "--config",
         "configs/mnist.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.multi_gpu
    env = prepare_multi_gpu_env(args)
    args = _filter_args(args, torchrun.get_args_parser(),
                        ["--training_script", args.training_script,
                         "--training_script_args", args.training_script_args])
    return torchrun.config_from_args(args), env


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_config_loads_with_accelerates_own_class(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(CLUSTER / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and not config.use_cpu
    assert config.num_processes % config.num_machines == 0
    assert config.num_processes // config.num_machines >= 2  # several GPUs per machine
    assert config.mixed_precision == "no"  # daae's train.mixed_precision decides
    assert (config.num_machines > 1) == (name == "multi_node")


def test_accelerate_one_node_config_launches_one_process_per_gpu(monkeypatch):
    # torchrun's argument handling sets OMP_NUM_THREADS in this process.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (launch, command, command_args), env = torchrun_config(
        CLUSTER / "accelerate" / "one_node.yaml")
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (1, 1, 4)
    assert command_args[:3] == ["-u", "-m", "daae"] and command_args[3] == "train"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    # A command-line --num_processes wins over the file, as the file tells users.
    (launch, _, _), _ = torchrun_config(CLUSTER / "accelerate" / "one_node.yaml",
                                        "--num_processes", "8")
    assert launch.nproc_per_node == 8


def test_accelerate_multi_node_config_takes_rank_and_address_per_machine(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (launch, _, command_args), _ = torchrun_config(
        CLUSTER / "accelerate" / "multi_node.yaml",
        "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (2, 2, 4)
    assert launch.rdzv_endpoint == "10.1.2.3:29500" and launch.rdzv_configs["rank"] == 1
    assert command_args[1:4] == ["-m", "daae", "train"]
    # What cluster/slurm/accelerate.sbatch passes for 3 nodes of 8 GPUs.
    (launch, _, _), _ = torchrun_config(
        CLUSTER / "accelerate" / "multi_node.yaml", "--num_machines", "3",
        "--num_processes", "24", "--machine_rank", "2", "--main_process_ip", "10.1.2.3",
        "--main_process_port", "29600")
    assert (launch.max_nodes, launch.nproc_per_node, launch.rdzv_endpoint) == (
        3, 8, "10.1.2.3:29600")


# --------------------------------------------------------------------------- SLURM

@pytest.mark.parametrize("name", SLURM_SCRIPTS)
def test_slurm_script_parses_and_requests_one_task_per_node(name):
    path = CLUSTER / "slurm" / name
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(path, os.X_OK)
    text = path.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert options["ntasks-per-node"] == "1" and int(options["nodes"]) >= 2
    assert "gpus-per-task" in options or "gpus-per-node" in options
    # Every step that does the work names its CPUs (srun stopped inheriting
    # --cpus-per-task from sbatch in SLURM 22.05).
    work_steps = [line for line in text.splitlines()
                  if line.lstrip().startswith("srun ") and "hostname" not in line]
    assert work_steps and all("--cpus-per-task=" in line for line in work_steps), work_steps
    # Only lines that precede the first command count as #SBATCH options.
    first_command = re.search(r"^[^#\n]", text, re.M).start()
    assert text.rfind("#SBATCH") < first_command


def test_slurm_search_script_starts_head_then_workers_then_the_search():
    text = (CLUSTER / "slurm" / "tune.sbatch").read_text()
    head = text.index("ray start --head --block")
    workers = text.index("ray start --block --address=")
    search = text.index('daae tune "${what[@]}" --address "$address"')
    assert head < workers < search
    assert "trap stop_ray EXIT" in text
