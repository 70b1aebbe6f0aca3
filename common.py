"""What trainer.py and finetuner.py share: CLI overrides of a dataclass config, distributed
setup, the run log, stopping on a signal, the preflight of output folders, atomic checkpoint
files and the Hub-format export/load."""
import contextlib
import dataclasses
import datetime
import difflib
import importlib
import inspect
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import typing

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------
# Config: nested dataclasses with `--group.key value` overrides

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def opt(default, allowed: str = "", **kwargs):
    """A config field with the values it allows, declared beside it and shown by --help:

        steps: int = opt(18_700, ">= 1")  # what the field is for
        precision: str = opt("auto", "auto, bf16 or fp32")
        adam_betas: str = opt("0.8,0.95", "2 numbers in [0, 1)")

    `allowed` is read by allows(): alternatives joined by "," or "or" (a value passes one of
    them), conditions joined by "and" (it passes all). An alternative is a bound (">= 1",
    "> 0", "<= 1", "< 1"), an interval ("in [0, 1)"), "a multiple of 128", "K numbers in
    [a, b)" (comma-separated), one of the named forms in NAMED, a literal ("auto", "0") or a
    pattern with N for digits ("cuda:N"). Without dataclasses (model.py), write the same as
    field(default=..., metadata={"allowed": "..."})."""
    return dataclasses.field(default=default, metadata={"allowed": allowed}, **kwargs)


def _distinct_integers(v: str) -> bool:
    try:
        xs = [int(x) for x in v.split(",")]
    except ValueError:
        return False
    return len(set(xs)) == len(xs)


def _distinct_file_names(v: str) -> bool:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in v.split(",")]
    return all(stems) and len(set(stems)) == len(stems)


NAMED = {"empty": lambda v: v == "", "non-empty": lambda v: bool(str(v).strip()),
         "a file name": lambda v: re.fullmatch(r"\w[\w.-]*", v) is not None,
         "USER/NAME": lambda v: re.fullmatch(r"[\w.-]+/[\w.-]+", v) is not None,
         "distinct integers": _distinct_integers,  # comma-separated
         "files with distinct names": _distinct_file_names}  # comma-separated paths whose stems differ


def _split(spec: str, seps: str) -> list[str]:
    """spec cut at the separators (a regex) that lie outside brackets."""
    parts, depth, start = [], 0, 0
    for m in re.finditer(rf"[\[\]()]|{seps}", spec):
        if m[0] in "[(":
            depth += 1
        elif m[0] in "])":
            depth -= 1
        elif depth == 0:
            parts.append(spec[start:m.start()])
            start = m.end()
    return parts + [spec[start:]]


def _in_interval(x: float, interval: str) -> bool:
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    return (lo <= x if interval[0] == "[" else lo < x) and (x <= hi if interval[-1] == "]" else x < hi)


def _passes(value, alt: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if m := re.fullmatch(r"(>=|>|<=|<) (\S+)", alt):
        limit = float(m[2])
        return number and math.isfinite(value) and {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[m[1]]
    if m := re.fullmatch(r"in ([\[(].*[\])])", alt):
        return number and _in_interval(value, m[1])
    if m := re.fullmatch(r"a multiple of (\d+)", alt):
        return number and value % int(m[1]) == 0
    if m := re.fullmatch(r"(\d+) numbers in ([\[(].*[\])])", alt):
        try:
            xs = [float(x) for x in str(value).split(",")]
        except ValueError:
            return False
        return len(xs) == int(m[1]) and all(_in_interval(x, m[2]) for x in xs)
    if alt == "finite":
        return number and math.isfinite(value)
    if alt in NAMED:
        return isinstance(value, str) and NAMED[alt](value)
    if number:
        try:
            return value == float(alt)
        except ValueError:
            return False
    return re.fullmatch(re.escape(alt).replace("N", r"\d+"), str(value)) is not None


def allows(spec: str, value) -> bool:
    """Whether `value` is one that an opt() field declaring `spec` allows (opt's grammar)."""
    return all(any(_passes(value, alt.strip()) for alt in _split(cond, r", | or "))
               for cond in _split(spec, r" and "))


def allowed_of(f: dataclasses.Field) -> str:
    return f.metadata.get("allowed", "")


def check_value(key: str, value, f: dataclasses.Field) -> None:
    """One line (SystemExit) when value is not one the field allows."""
    spec = allowed_of(f)
    if spec and not allows(spec, value):
        raise SystemExit(f"--{key} must be {spec}, got {value!r}")


def check_config(cfg, group: str) -> None:
    """Every field of a config dataclass instance against what it allows (opt): a script calls
    it on each of its config groups before it writes anything; the first bad value exits in
    one line naming the option, e.g. `--train.steps must be >= 1, got 0`."""
    for f in dataclasses.fields(cfg):
        check_value(f"{group}.{f.name}", getattr(cfg, f.name), f)


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


def valid_keys(groups: dict, hidden: tuple = ()) -> list[str]:
    return [f"{g}.{f.name}" for g, cls in groups.items() for f in dataclasses.fields(cls)
            if f.init and f"{g}.{f.name}" not in hidden]


def field_docs(cls) -> dict[str, str]:
    """Each field's description, from the comments in its dataclass's source: the field's
    inline comment and the comment lines that continue it below, or, for a field without an
    inline comment, the comment block right above it."""
    docs, block, last = {}, [], None
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            block.append(text[1:].strip())
            continue
        m = re.match(r"(\w+)\s*:[^=]*=\s*(?:[^#]|#(?=[^ ]))*?(?:\s+#\s*(.*))?$", text)
        if not m:
            block = []
            continue
        name, inline = m.groups()
        if inline:
            if last is not None and block:  # comment lines under the previous field's inline comment continue it
                docs[last] += " " + " ".join(block)
            docs[name], last = inline, name
        else:
            docs[name], last = " ".join(block), None
        block = []
    if last is not None and block:
        docs[last] += " " + " ".join(block)
    return docs


def help_text(groups: dict, hidden: tuple = (), flags: dict | None = None, usage: str = "") -> str:
    """Every option of the config groups with its type, default and description, then flags."""
    out = [usage, ""] if usage else []
    for g, cls in groups.items():
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        out.append(f"--{g}.* ({cls.__name__}):")
        for f in dataclasses.fields(cls):
            if not f.init or f"{g}.{f.name}" in hidden:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = f"{allowed_of(f)}; " if allowed_of(f) else ""
            out.append(f"  --{g}.{f.name} {getattr(hints[f.name], '__name__', hints[f.name])} ({allowed}default: {default!r})")
            if docs.get(f.name):
                out.append(textwrap.fill(docs[f.name], width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
        out.append("")
    for name, doc in (flags or {}).items():
        out.append(f"  --{name}\n" + textwrap.fill(doc, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(out).rstrip() + "\n"


def parse_overrides(argv: list[str], groups: dict, flags: dict | None = None, hidden: tuple = (),
                    usage: str = "") -> tuple[dict, set]:
    """argv like ["--train.lr", "3e-4", "--model.preset=small", "--demo"] -> ({group: {key:
    typed value}}, {flags given}). groups maps a name to its dataclass; flags maps a bare flag
    to its description. --help prints every option (hidden ones left out) and exits 0; an
    unknown key, a value of the wrong type or one its field does not allow (opt) exits with one
    line; an unknown key's line suggests the nearest option."""
    flags = flags or {}
    if "--help" in argv or "-h" in argv:
        print(help_text(groups, hidden, flags, usage), end="")
        raise SystemExit(0)
    out = {g: {} for g in groups}
    given = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}; options look like --train.lr 3e-4 (--help lists them)")
        key, eq, value = arg[2:].partition("=")
        if key in flags:
            given.add(key)
            i += 1
            continue
        group, _, name = key.partition(".")
        hints = typing.get_type_hints(groups[group]) if group in groups else {}
        fields = {f.name for f in dataclasses.fields(groups[group]) if f.init} if group in groups else set()
        if name not in fields:
            known = valid_keys(groups, hidden) + list(flags)
            near = [k for k in known if k.startswith(key)][:3] or difflib.get_close_matches(key, known, n=3, cutoff=0.7)
            hint = f"; did you mean {' or '.join('--' + k for k in near)}?" if near else ""
            raise SystemExit(f"unknown option --{key}{hint} (--help lists every option)")
        if not eq:
            if i + 1 >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        out[group][name] = _convert(value, hints[name], key)
        check_value(key, out[group][name], next(f for f in dataclasses.fields(groups[group]) if f.name == name))
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


def check_device(device: str, option: str = "--train.device") -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where torch sees a GPU: one line otherwise."""
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise SystemExit(f"{option} {device!r}: choose auto (cuda if available), cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise SystemExit(f"{option} {device}: CUDA is not available ({why}, torch {torch.__version__}); "
                         f"use {option} cpu or auto")


def setup_distributed(device: str = "auto") -> Dist:
    """The process group (under torchrun) and this rank's device: under torchrun each rank takes
    GPU LOCAL_RANK; one process takes cuda:N when asked for it."""
    check_device(device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        index = int(device.split(":")[1]) if ":" in device and world == 1 else local_rank
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
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


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the machine type where that is not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): on a 2-core Xeon with
    AMX, 2.4 TFLOP/s against 0.34 in float32 (records/2026-12-05-cpu-speed)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def hardware_summary(device: torch.device) -> str:
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, platform {platform.platform()}",
             f"cpu: {cpu_name()} x{os.cpu_count()}, {torch.get_num_threads()} torch threads, "
             f"native bf16 {'yes' if native_bf16_cpu() else 'no'}"]
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

    def header(self, code_files: list[str], config: dict, device: torch.device, append: bool = False):
        """A new log starts with the code, config, versions and hardware; append (a resumed
        run) adds them after what the log already holds."""
        if not self.master:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a" if append else "w") as f:
            for path in code_files:  # named relative to the repository: a log does not show where it was cloned
                f.write(f"==> {os.path.relpath(path, os.path.dirname(os.path.abspath(__file__)))} <==\n{open(path).read()}\n")
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
    """prefix-date-time-xxxxxxxx: the random suffix (32 bits) keeps runs started in one second apart
    (16 bits made two of 100 ids collide about once in 13 tries)."""
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def agree(value, d: Dist):
    """Rank 0's value on every rank (e.g. a generated run id)."""
    if d.world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def refuse_existing_run(run_id: str, paths: list[str], resume_hint: str, d: Dist) -> None:
    """A run id whose log, checkpoints or outputs exist belongs to an earlier run: reusing it
    would overwrite them and append to its log. Rank 0 looks (before anything is written) and
    every rank follows its answer."""
    found = agree([p for p in paths if os.path.exists(p)] if d.master else None, d)
    if found:
        raise SystemExit(f"run id {run_id!r} is taken ({', '.join(found)}): choose another --train.run_id, "
                         f"{resume_hint}or pass --train.overwrite true to write over it")


# ----------------------------------------------------------------------------------------
# Files: atomic writes so a kill mid-write never corrupts the last good file


def atomic_torch_save(obj, path: str):
    """torch.save into path.tmp<pid>, then renamed over path: a kill mid-write never leaves a
    partial file under the final name. An exception mid-write (a second Ctrl-C, a full disk)
    removes the temporary file; a SIGKILL leaves it, and a resumed run removes it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def preflight(needs: list[tuple[str, int, str]], d: Dist) -> None:
    """Before the first step: each (folder, bytes, option) can be created and written, and its
    filesystem has room for the bytes the run will write there (summed over the folders that
    share a filesystem). Rank 0 looks (it writes the checkpoints and exports) and every rank
    follows its answer: a one-line exit naming the folder and the option. Folders this check
    creates are removed again, so a run that fails later leaves no trace of its id."""
    problem = None
    if d.master:
        room = {}  # filesystem -> [free bytes, bytes needed, options]
        for folder, need, option in needs:
            created, top = [], os.path.abspath(folder)
            while not os.path.exists(top):  # the folders makedirs will create, deepest first
                created.append(top)
                top = os.path.dirname(top)
            try:
                os.makedirs(folder, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight"):
                    pass
                usage = shutil.disk_usage(folder)
                device = os.stat(folder).st_dev
            except OSError as e:
                problem = f"preflight: cannot write to {folder} ({e.strerror or e}): fix it or choose another {option}"
                break
            finally:
                for path in created:
                    if os.path.isdir(path) and not os.listdir(path):
                        os.rmdir(path)
            entry = room.setdefault(device, [usage.free, 0, []])
            entry[1] += need
            entry[2].append(f"{option} {folder}: {need / 1e9:.2f} GB")
        for free, need, parts in room.values():
            if problem is None and free < need:
                problem = (f"preflight: {free / 1e9:.2f} GB free where this run will write {need / 1e9:.2f} GB "
                           f"({'; '.join(parts)}): free some space or point the option elsewhere")
    problem = agree(problem, d)
    if problem:
        raise SystemExit(problem)


# ----------------------------------------------------------------------------------------
# Signals: SIGTERM / SIGINT stop a run at the end of a step, with a checkpoint


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop: the handler only records the signal, and the
    training loop, which reads it at the end of each step (every rank's vote in one
    all-reduce), finishes the step, saves and exits with the command that resumes. A second
    SIGINT raises KeyboardInterrupt at once (an abort: nothing more is saved). One Ctrl-C in a
    terminal reaches a torchrun worker twice, from the terminal (the whole process group) and
    forwarded by torchrun, so a SIGINT within `same_s` of the first counts as the same one;
    repeated SIGTERMs (a scheduler and torchrun both forwarding) just keep the request.
    The handlers are installed on entering (main thread only) and the previous ones restored
    on leaving."""

    same_s = 1.0

    def __init__(self):
        self.signum, self.at, self.previous = None, 0.0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.at > self.same_s:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal to another rank"

    @property
    def exit_code(self) -> int:
        """128 + the signal, what a shell reports for a process the signal ended."""
        return 128 + (self.signum or signal.SIGTERM)


@contextlib.contextmanager
def failures_logged(d: Dist, log, aborted: str):
    """Around a run once its log exists: an expected failure (SystemExit with a message) is
    written to the log as well as stderr; a second SIGINT logs `aborted` and exits 130 without
    a barrier (the other ranks may be anywhere); otherwise the process group is closed."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            log(e.code, console=False)  # Python prints it on stderr: into the log, not twice on the console
        cleanup_distributed(d)
        raise
    except KeyboardInterrupt:
        log(aborted)
        if d.world > 1:
            dist.destroy_process_group()
        raise SystemExit(130) from None
    cleanup_distributed(d)


def resume_command(script: str, argv: list[str], run_id: str, d: Dist) -> str:
    """The command that continues this run: the same options, --train.resume auto and
    --train.run_id RUN_ID in place of any given, under the launcher this run used."""
    kept, i = [], 0
    while i < len(argv):
        key, eq, _ = argv[i].partition("=")
        if key in ("--train.resume", "--train.run_id"):
            i += 1 if eq else 2
            continue
        kept.append(argv[i])
        i += 1
    here = os.path.relpath(script)
    script = script if here.startswith("..") else here
    launcher = ["python"]
    if d.world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={per_node}"] if per_node == d.world else \
            ["torchrun", f"--nnodes={d.world // per_node}", f"--nproc_per_node={per_node}", "--rdzv_endpoint=HOST:PORT"]
    return shlex.join(launcher + [script] + kept + ["--train.resume", "auto", "--train.run_id", run_id])


# ----------------------------------------------------------------------------------------
# Hub format: a Hugging Face model folder (local, or a Hub repo) that transformers loads with
# trust_remote_code=True through hf_kbert.py, and that this repo's loaders read back

EXPORT_CODE = ("model.py", "hf_kbert.py")  # the remote code an export carries: model.py verbatim + the wrapper
ARCHITECTURES = {None: "KBertForMaskedLM", "classification": "KBertForSequenceClassification",
                 "span": "KBertForQuestionAnswering"}  # by config["head"]; classes of hf_kbert.py
AUTO_MAP = {"AutoConfig": "hf_kbert.KBertConfig", "AutoModel": "hf_kbert.KBertModel",
            "AutoModelForMaskedLM": "hf_kbert.KBertForMaskedLM",
            "AutoModelForSequenceClassification": "hf_kbert.KBertForSequenceClassification",
            "AutoModelForQuestionAnswering": "hf_kbert.KBertForQuestionAnswering"}


def save_pretrained(folder: str, state_dict: dict, config: dict, card: str, max_len: int | None = None, log=print):
    """Write an export folder atomically (into folder.tmp, then renamed):
        config.json        transformers' config: model_type kbert, auto_map, model.py's ModelConfig
                           fields (flat), a classification head's id2label; this repo's record
                           of the run (config minus "model") under "kbert"
        model.safetensors  the encoder as kbert.* (hf_kbert's base_model_prefix), a head as head.*
        tokenizer.json, tokenizer_config.json   the fast tokenizer (tokenizer.save_hf_tokenizer)
        model.py, hf_kbert.py                    the remote code
        README.md          the card
    state_dict: KBERT's, plus head.* for a task head. config: {"model": ModelConfig fields,
    "head": "classification" or "span" (absent: the MLM head alone), "labels": the classes, and
    anything else to record (tokens_seen, task, metrics, ...)}. max_len: the tokenizer's
    model_max_length (default: the global window). Files 0644 and folders 0755 whatever the
    umask, so that other users can read an export (safetensors writes 0600)."""
    from safetensors.torch import save_file

    record = {k: v for k, v in config.items() if k not in ("model", "architecture")}  # "architecture": the old format's
    head, labels = record.get("head"), record.get("labels")
    if head not in ARCHITECTURES or (head == "classification" and not labels):
        raise ValueError(f"config['head'] must be one of {list(ARCHITECTURES)} (classification with its labels), got {head!r}")
    dtype = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    hf_config = {"model_type": "kbert", "architectures": [ARCHITECTURES[head]], "auto_map": AUTO_MAP, **config["model"],
                 "dtype": dtype}
    if head == "classification":
        hf_config.update(id2label={str(i): name for i, name in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)},
                         problem_type="regression" if len(labels) == 1 else "single_label_classification")
    hf_config["kbert"] = record

    tmp = folder.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    weights = {(k if k.startswith("head.") else f"kbert.{k}"): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in EXPORT_CODE:
        shutil.copyfile(os.path.join(here, name), os.path.join(tmp, name))
    try:  # the tokenizer needs GPT-2's BPE files (tiktoken's cache) and transformers: a run never fails over it
        import tokenizer

        tokenizer.save_hf_tokenizer(tmp, max_len or config["model"]["global_window"])
    except (ImportError, RuntimeError) as e:
        log(f"warning: {folder} gets no tokenizer files ({type(e).__name__}: {str(e)[:300]}). Add them later with "
            f"python -c \"import tokenizer; tokenizer.save_hf_tokenizer('{folder}', {max_len or config['model']['global_window']})\"")
    os.chmod(tmp, 0o755)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o644)
    if os.path.isdir(folder):
        old = folder.rstrip("/") + ".old"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def transformers_usage(where: str, head: str | None = None) -> str:
    """The card's "Use it with transformers" section for an export at `where` (folder or Hub id);
    tests/test_export.py runs its code."""
    if head is None:
        code = (f'from transformers import AutoModel, AutoTokenizer, pipeline\n\n'
                f'fill = pipeline("fill-mask", model="{where}", trust_remote_code=True)\n'
                f'print(fill("The capital of France is [MASK]."))\n\n'
                f'tok = AutoTokenizer.from_pretrained("{where}", trust_remote_code=True)\n'
                f'model = AutoModel.from_pretrained("{where}", trust_remote_code=True)\n'
                f'batch = tok(["A first text.", "A second, longer text."], padding=True, return_tensors="pt")\n'
                f'hidden = model(**batch).last_hidden_state  # (2, T, d_model); padding is masked out\n')
    elif head == "classification":
        code = (f'from transformers import pipeline\n\n'
                f'classify = pipeline("text-classification", model="{where}", trust_remote_code=True)\n'
                f'print(classify({{"text": "A man is playing a guitar.", "text_pair": "A person makes music."}}))\n')
    else:
        code = (f'from transformers import AutoModelForQuestionAnswering, AutoTokenizer\n\n'
                f'tok = AutoTokenizer.from_pretrained("{where}", trust_remote_code=True)\n'
                f'model = AutoModelForQuestionAnswering.from_pretrained("{where}", trust_remote_code=True)\n'
                f'inputs = tok("Where is Paris?", "Paris is the capital of France.", return_tensors="pt")\n'
                f'out = model(**inputs)  # start_logits, end_logits: one per token\n'
                f'start, end = int(out.start_logits.argmax()), int(out.end_logits.argmax())\n'
                f'print(tok.decode(inputs["input_ids"][0, start:end + 1]))\n')
    return ("## Use it with transformers\n\nThe folder is a Hugging Face model with its own code (`model.py`, "
            "`hf_kbert.py`), hence `trust_remote_code=True` (transformers 5 reads the model's config before the "
            "tokenizer's, so AutoTokenizer wants it too):\n\n```python\n" + code + "```\n")


def looks_like_path(name: str) -> bool:
    """A model name that means a local folder, never a Hub id: it exists, starts like a path
    (./x, ../x, /x, ~/x), lies under the folders this repo writes (exports/, finetuned/) or under
    a folder that exists here."""
    return (os.path.exists(name) or name.startswith((".", "/", "~", "exports/", "finetuned/"))
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def load_pretrained(path_or_repo: str) -> tuple[dict, dict]:
    """(config, state dict) from a local export folder or a Hub model id, in save_pretrained's
    terms: config {"model": ModelConfig fields, what the run recorded}, the encoder's weights
    under KBERT's own names and a task head's as head.*. Exports written before the
    transformers format (config.json {"architecture": "KBERT", "model": ...}) load too."""
    from safetensors.torch import load_file

    from model import ModelConfig

    folder = path_or_repo
    if not os.path.isdir(folder):
        if looks_like_path(path_or_repo) and not os.path.exists(folder):
            raise FileNotFoundError(f"no such export folder: {path_or_repo} (a Hub id looks like USER/kbert-base)")
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
        raw = json.load(f)
    if raw.get("model_type") != "kbert" and raw.get("architecture") != "KBERT":
        raise SystemExit(f"{path_or_repo}: config.json is not a KBERT export (model_type {raw.get('model_type')!r})")
    state = load_file(os.path.join(folder, "model.safetensors"))
    if raw.get("architecture") == "KBERT":  # the old format: unprefixed weights, no transformers files
        return raw, state
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.init]
    config = {"model": {k: raw[k] for k in fields if k in raw}, **raw.get("kbert", {})}
    return config, {k.removeprefix("kbert."): v for k, v in state.items()}


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
