"""What trainer.py and finetuner.py share: CLI overrides of a dataclass config, distributed
setup, the run log, atomic checkpoint files and the Hub-format export/load."""
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import typing

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------
# Config: nested dataclasses with `--group.key value` overrides

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _convert(value: str, typ, key: str):
    if typ is bool:  # argparse's type=bool would turn "False" into True
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise SystemExit(f"--{key}: expected true/false, got {value!r}")
    try:
        return typ(value)
    except ValueError:
        raise SystemExit(f"--{key}: expected {typ.__name__}, got {value!r}") from None


def valid_keys(groups: dict) -> list[str]:
    return [f"{g}.{f.name}" for g, cls in groups.items() for f in dataclasses.fields(cls) if f.init]


def parse_overrides(argv: list[str], groups: dict, flags: tuple = ()) -> tuple[dict, set]:
    """argv like ["--train.lr", "3e-4", "--model.preset=small", "--demo"] -> ({group: {key:
    typed value}}, {flags given}). groups maps a name to its dataclass; unknown keys and
    bad values exit with a message that lists the valid keys."""
    out = {g: {} for g in groups}
    given = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}; options look like --train.lr 3e-4")
        key, eq, value = arg[2:].partition("=")
        if key in flags:
            given.add(key)
            i += 1
            continue
        group, _, name = key.partition(".")
        hints = typing.get_type_hints(groups[group]) if group in groups else {}
        fields = {f.name for f in dataclasses.fields(groups[group]) if f.init} if group in groups else set()
        if name not in fields:
            raise SystemExit(f"unknown option --{key}. Valid options: "
                             + " ".join(f"--{k}" for k in valid_keys(groups)) + "".join(f" --{f}" for f in flags))
        if not eq:
            if i + 1 >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        out[group][name] = _convert(value, hints[name], key)
        i += 1
    return out, given


def config_to_dict(cfg) -> dict:
    return {f.name: (config_to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else v)
            for f in dataclasses.fields(cfg)}


# ----------------------------------------------------------------------------------------
# Distributed: plain `python` is world size 1; torchrun sets RANK/WORLD_SIZE/LOCAL_RANK


@dataclasses.dataclass
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1:
        # torch 2.13: importing torch._dynamo (the first optimizer or compile does) after
        # init_process_group keeps the default group alive past destroy_process_group. Its gloo
        # threads then outlive the interpreter and ~1 run in 10 aborts at exit ("terminate
        # called without an active exception"). Imported first, the group is freed on destroy.
        importlib.import_module("torch._dynamo")
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, local_rank, world, dev)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def cleanup_distributed(d: Dist):
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Logging: logs/<run_id>.txt starts with the code, the config, versions and hardware


def hardware_summary(device: torch.device) -> str:
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, platform {platform.platform()}",
             f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}, cuda {torch.version.cuda}")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except Exception:
            pass
    return "\n".join(lines)


class RunLog:
    def __init__(self, run_id: str, master: bool, log_dir: str = "logs"):
        self.master = master
        self.path = os.path.join(log_dir, f"{run_id}.txt")
        if master:
            os.makedirs(log_dir, exist_ok=True)

    def header(self, code_files: list[str], config: dict, device: torch.device):
        if not self.master:
            return
        with open(self.path, "a") as f:
            for path in code_files:
                f.write(f"==> {path} <==\n{open(path).read()}\n")
            f.write("==> config <==\n" + json.dumps(config, indent=2) + "\n")
            versions = {m: getattr(sys.modules[m], "__version__", "?") for m in ("torch", "numpy", "tiktoken", "huggingface_hub") if m in sys.modules}
            f.write("==> versions <==\n" + json.dumps(versions) + "\n")
            f.write("==> hardware <==\n" + hardware_summary(device) + "\n")
            f.write(f"==> started {datetime.datetime.now().isoformat(timespec='seconds')} <==\n")

    def __call__(self, msg: str, console: bool = True):
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------
# Files: atomic writes so a kill mid-write never corrupts the last good file


def atomic_torch_save(obj, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Hub format: config.json + model.safetensors + README.md, local folder or Hub repo


def save_pretrained(folder: str, state_dict: dict, config: dict, card: str):
    """Write a Hub-format folder atomically (into folder.tmp, then renamed)."""
    from safetensors.torch import save_file

    tmp = folder.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    if os.path.isdir(folder):
        old = folder.rstrip("/") + ".old"
        os.replace(folder, old)
        os.replace(tmp, folder)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def load_pretrained(path_or_repo: str) -> tuple[dict, dict]:
    """(config dict, state dict) from a local export folder or a Hub model id."""
    from safetensors.torch import load_file

    folder = path_or_repo
    if not os.path.isdir(folder):
        if os.path.exists(folder) or path_or_repo.count("/") != 1:
            raise FileNotFoundError(f"{path_or_repo!r} is neither an export folder nor a Hub id like USER/kbert-base")
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(repo_id=path_or_repo, allow_patterns=["config.json", "model.safetensors", "README.md"])
        except Exception as e:
            raise FileNotFoundError(f"could not fetch {path_or_repo!r} from the Hugging Face Hub "
                                    f"({type(e).__name__}); pass a local export folder instead") from None
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder} has no {name}; is it a KBERT export folder?")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(folder, "model.safetensors"))


def _redact_hub_tokens(text: str) -> str:
    """text with every Hub token this process could send (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, the
    `huggingface-cli login` one) masked: error messages of HTTP clients may quote it."""
    tokens = {os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    try:
        from huggingface_hub import get_token

        tokens.add(get_token())
    except Exception:  # an old huggingface_hub without get_token, or an unreadable token file
        pass
    for token in sorted(filter(None, tokens), key=len, reverse=True):  # longest first: no half-masked token
        text = text.replace(token, "hf_***")
    return text


def push_to_hub(folder: str, repo_id: str, log, retries: int = 3, wait_s: float = 5.0) -> bool:
    """Upload a folder to a Hub model repo (token from HF_TOKEN or `huggingface-cli login`;
    masked in everything logged). Retried; a failure, even of the client's construction, is
    reported and the local folder is kept."""
    from huggingface_hub import HfApi

    for attempt in range(1, retries + 1):
        try:
            api = HfApi()
            api.create_repo(repo_id, repo_type="model", exist_ok=True)
            api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                              commit_message=f"KBERT export from {os.path.basename(folder)}")
            log(f"pushed {folder} to https://huggingface.co/{repo_id}")
            return True
        except Exception as e:  # masked before the cut, which could otherwise keep half a token
            log(f"push to {repo_id} failed (attempt {attempt}/{retries}): {type(e).__name__}: {_redact_hub_tokens(str(e))[:200]}")
            if attempt < retries:
                time.sleep(wait_s * attempt)
    log(f"giving up on the push; the export is safe at {folder} (push it later with huggingface-cli upload {repo_id} {folder})")
    return False
