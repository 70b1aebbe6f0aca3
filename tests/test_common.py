"""common.py: the Hub push (retries, the local copy kept, no token in anything it logs);
stop signals, interrupted atomic saves, the resume command."""
import os
import signal

import pytest
import torch

import common

ENV_TOKEN = "hf_EnvSecretToken0123456789abcdef"  # HF_TOKEN
LOGIN_TOKEN = "hf_LoginSecretToken9876543210zyxw"  # what `huggingface-cli login` stored


def test_push_to_hub_retries_keeps_local_copy_and_never_shows_the_token(tmp_path, monkeypatch):
    """The fake Hub fails with messages that quote both tokens, once with a token that straddles
    the 200-character cut of the logged message. Every failed attempt is logged and retried,
    the export stays on disk, and no log line or exception text holds any part of either
    token, while the rest of each error message survives."""
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: LOGIN_TOKEN)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    errors = [OSError(f"401 Client Error: Unauthorized for url https://huggingface.co/api/repos/create "
                      f"(Authorization: Bearer {ENV_TOKEN})"),
              OSError("403 Forbidden: " + "x" * 165 + f" token={LOGIN_TOKEN}")]
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", folder_path))
            if errors:
                raise errors.pop(0)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lines = []

    def assert_clean():
        shown = "\n".join(lines)
        for name, token in (("HF_TOKEN", ENV_TOKEN), ("the login token", LOGIN_TOKEN)):
            assert token[3:9] not in shown, f"part of {name} reached the log"

    def push(retries):
        try:
            return common.push_to_hub(str(folder), "me/kbert-test", lines.append, retries=retries, wait_s=0)
        except Exception as e:  # nothing may escape; if something does, its text is checked too
            lines.append(f"raised {type(e).__name__}: {e}")
            return None

    ok = push(retries=3)
    print("\n".join(lines))
    assert ok is True and [c[0] for c in calls] == ["create", "upload"] * 3
    assert "attempt 1/3" in lines[0] and "401 Client Error: Unauthorized" in lines[0]
    assert "attempt 2/3" in lines[1] and "403 Forbidden" in lines[1] and "pushed" in lines[-1]
    assert_clean()

    calls.clear()
    errors[:] = [OSError(f"Hub down; retry with token {ENV_TOKEN}")] * 2
    failed = push(retries=2)
    print("\n".join(lines[3:]))
    assert failed is False and len(calls) == 4
    assert "export is safe" in lines[-1] and (folder / "model.safetensors").read_bytes() == b"weights"
    assert_clean()

    class BrokenApi:  # the client itself refuses the token
        def __init__(self):
            raise ValueError(f"Invalid user token {LOGIN_TOKEN}")

    monkeypatch.setattr(huggingface_hub, "HfApi", BrokenApi)
    ok = push(retries=1)
    print("\n".join(lines[-2:]))
    assert_clean()
    assert ok is False and "Invalid user token" in lines[-2]


def test_stop_signals_ask_once_and_a_second_sigint_aborts():
    """SIGTERM or SIGINT only record a request (the loop stops at the step's end); repeats
    within same_s (one Ctrl-C that reaches a torchrun worker from the terminal and again
    through torchrun) and repeated SIGTERMs change nothing; a later SIGINT aborts at once;
    the previous handlers come back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with common.StopSignals() as s:
        assert not s.requested and s.name == "a signal to another rank"
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.requested and s.name == "SIGTERM" and s.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within a second of the first: the same request
        assert s.name == "SIGTERM"
        s.same_s = 0.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_interrupted_atomic_save_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    path = str(tmp_path / "step_0000001.pt")
    common.atomic_torch_save({"step": 1}, path)

    def interrupted(obj, f):  # half a file, then a second Ctrl-C
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_torch_save({"step": 2}, path)
    assert os.listdir(tmp_path) == ["step_0000001.pt"] and torch.load(path, weights_only=True) == {"step": 1}


def test_resume_command_keeps_the_options_and_names_the_run():
    argv = ["--demo", "--train.run_id=old", "--train.resume", "checkpoints/old", "--data.train_files", "a b/*.bin"]
    one = common.resume_command("/x/trainer.py", argv, "old", common.Dist(0, 0, 1, torch.device("cpu")))
    assert one == "python /x/trainer.py --demo --data.train_files 'a b/*.bin' --train.resume auto --train.run_id old"
    assert common.resume_command("/x/trainer.py", [], "r", common.Dist(0, 0, 8, torch.device("cpu"))).startswith(
        "torchrun --standalone --nproc_per_node=8 /x/trainer.py --train.resume auto")
