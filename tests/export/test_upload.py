"""export_model.py --hf_repo_name where the Hub cannot be reached: the model card's command keeps its export and
says how to upload it again; that one command uploads the folder as it is, never exporting it a second time.

No test needs a network. A failed upload is real: an endpoint where nothing listens (HF_ENDPOINT) or
huggingface_hub's offline mode. A successful one goes to a stand-in for the Hub's three upload requests
(FakeHub), through the unchanged huggingface_hub client.
"""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import REPO, cpu_env, free_port, snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_training.checkpoints.read import resolve_checkpoint
from model_training.export.cli import main_export
from model_training.layout import RUN_FILES

EXPORT_MODEL = REPO / "export_model.py"
AUDITED = Path(__file__).with_name("audited_export.py")
REPO_NAME = "someone/tiny-falcon-sft"
FLAG_TOKEN, ENV_TOKEN = "hf_FlagTokenDoNotLeak123", "hf_EnvTokenDoNotLeak456"
AGAIN = "upload it again with: "


def run(script: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``python script args``, with HF_TOKEN set too, so that neither way of passing a token may show."""
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=cpu_env(HF_TOKEN=ENV_TOKEN, **env),
                          capture_output=True, text=True, timeout=300)


def hub_at(endpoint: str) -> dict[str, str]:
    """The environment of a command that uploads to ``endpoint`` (cpu_env sets the Hub offline)."""
    return {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The command's one error line, which must be the last thing it says."""
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def upload_again(error: str) -> list[str]:
    """The arguments of the re-upload command that ``error`` names, with the token in place of its placeholder."""
    python, script, *args = shlex.split(error.split(AGAIN, 1)[1])
    assert (python, script) == ("python", "export_model.py"), error
    return [FLAG_TOKEN if arg == "<token>" else arg for arg in args]


def assert_no_token(result: subprocess.CompletedProcess, folder: Path) -> None:
    written = [path.read_bytes() for path in folder.rglob("*") if path.is_file()]
    for token in (FLAG_TOKEN, ENV_TOKEN):
        assert token not in result.stdout + result.stderr
        assert not any(token.encode() in data for data in written)


@pytest.fixture(scope="module")
def failed_upload(
    zero2_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess, Path]:
    """The model card's command, verbatim, on a copy of the ZeRO-2 run with nothing listening at the Hub's
    address: (its result, the run's folder). The copy's checkpoints are then deleted, so that any later
    command that exports again instead of uploading the kept folder fails."""
    run_folder = Path(shutil.copytree(zero2_run, tmp_path_factory.mktemp("upload") / "run"))
    result = run(EXPORT_MODEL, ["--dtype", "bf16", "--hf_repo_name", REPO_NAME, "--auth_token", FLAG_TOKEN,
                                str(run_folder), "--max_shard_size", "2GB"],
                 **hub_at(f"http://127.0.0.1:{free_port()}"))
    for checkpoint in run_folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return result, run_folder


@pytest.mark.slow
def test_the_model_card_command_keeps_its_export_when_the_upload_fails(failed_upload):
    result, run_folder = failed_upload
    folder = run_folder / "tiny-falcon-sft"  # the repository's name, inside the run folder
    assert result.returncode == 1, result.stderr[-4000:]
    assert f"exported {run_folder} to {folder}" in result.stdout
    error = error_line(result)
    assert error.startswith(f"export_model.py: error: the upload to '{REPO_NAME}' failed: ConnectError"), error
    assert error.endswith(f"{folder} is complete, {AGAIN}python export_model.py {folder} --hf_repo_name {REPO_NAME} "
                          "--auth_token <token>"), error
    assert_no_token(result, folder)
    # A complete export that unchanged transformers code loads, with nothing left beside it.
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert model.dtype == torch.bfloat16 and not any(info.values()), info
    assert AutoTokenizer.from_pretrained(folder).chat_template
    # No partial folder: the only hidden entry is the training run's own list of its files.
    assert [p.name for p in run_folder.iterdir() if p.name.startswith(".")] == [RUN_FILES]


@pytest.mark.slow
def test_the_re_upload_command_uploads_the_kept_folder_as_it_is(failed_upload):
    result, run_folder = failed_upload
    args = upload_again(error_line(result))
    before = snapshot([run_folder])
    # The command's own main under an audit hook (audited_export.py); offline: the upload fails at once.
    again = run(AUDITED, args)
    assert again.returncode == 1, again.stderr[-4000:]
    error = error_line(again)
    assert f"the upload to '{REPO_NAME}' failed: OfflineModeIsEnabled" in error
    assert error.endswith(error_line(result).split(AGAIN, 1)[1]), error  # the same command, for next time
    # Exporting again would have to write (even into a temporary folder that is gone afterwards), and it
    # finds no checkpoint: the run folder is as it was and the command wrote nothing anywhere.
    assert json.loads(again.stdout.splitlines()[-1]) == []
    assert snapshot([run_folder]) == before
    assert_no_token(again, Path(args[0]))


@pytest.mark.slow
def test_the_model_card_flags_upload_the_kept_folder_to_a_hub(failed_upload, fake_hub):
    _, run_folder = failed_upload
    folder = run_folder / "tiny-falcon-sft"
    result = run(EXPORT_MODEL, ["--dtype", "bf16", "--hf_repo_name", REPO_NAME, "--auth_token", FLAG_TOKEN,
                                str(folder), "--max_shard_size", "2GB"], **hub_at(fake_hub.endpoint))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-1] == f"uploaded {folder} to {fake_hub.endpoint}/{REPO_NAME}"
    assert fake_hub.files == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert fake_hub.tokens == {f"Bearer {FLAG_TOKEN}"}  # the flag's token wins over HF_TOKEN, and reaches the Hub
    assert_no_token(result, folder)


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--dtype", "fp32"], "model.safetensors holds BF16 weights, not F32: give --output_folder for a converted copy"),
    (["--max_shard_size", "100KB"], "more than --max_shard_size: give --output_folder for a copy in smaller shards"),
], ids=["dtype", "max_shard_size"])
def test_a_model_folder_that_needs_converting_is_not_uploaded_as_it_is(failed_upload, capsys, flags, message):
    folder = failed_upload[1] / "tiny-falcon-sft"
    assert main_export([str(folder), "--hf_repo_name", REPO_NAME, *flags]) == 2  # not 1: no upload was tried
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_folder_with_a_cut_short_shard_is_not_uploaded(failed_upload, tmp_path, capsys):
    folder = Path(shutil.copytree(failed_upload[1] / "tiny-falcon-sft", tmp_path / "model"))
    with open(folder / "model.safetensors", "r+b") as f:  # as a copy that was interrupted
        f.truncate(f.seek(0, 2) - 1)
    assert main_export([str(folder), "--hf_repo_name", REPO_NAME]) == 2
    assert "model.safetensors is incomplete: its header describes" in capsys.readouterr().err


@pytest.mark.slow
def test_the_same_command_again_points_at_the_kept_export(failed_upload, zero2_run, tmp_path, capsys):
    """After a failed upload, the model card's command again must not ask for --overwrite alone: that would
    export everything again."""
    run_folder = tmp_path / "run"
    shutil.copytree(resolve_checkpoint(zero2_run, zero2_run), run_folder / "checkpoint-000008")
    folder = Path(shutil.copytree(failed_upload[1] / "tiny-falcon-sft", run_folder / "tiny-falcon-sft"))
    before = snapshot([folder])
    assert main_export(["--dtype", "bf16", "--hf_repo_name", REPO_NAME, str(run_folder)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"the output folder {folder} exists and is not empty; pass --overwrite to replace it, or upload it as it "
        f"is with: python export_model.py {folder} --hf_repo_name {REPO_NAME}"
    )
    assert snapshot([folder]) == before


class FakeHub(ThreadingHTTPServer):
    """The Hub's side of HfApi.create_repo and upload_folder: create the repository, answer that every file
    goes in the commit itself ("regular", no LFS or Xet storage), take the commit. Keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_port}"
        self.files: dict[str, bytes] = {}
        self.tokens: set[str] = set()

    def reply(self, path: str, body: bytes) -> dict | None:
        if path == "/api/repos/create":
            request = json.loads(body)
            return {"url": f"{self.endpoint}/{request['organization']}/{request['name']}"}
        if "/preupload/" in path:
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                              for f in json.loads(body)["files"]]}
        if "/commit/" in path:
            for item in map(json.loads, body.splitlines()):
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return {"commitUrl": f"{self.endpoint}/{REPO_NAME}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return None


class _FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_POST(self) -> None:
        self.server.tokens.add(self.headers.get("authorization"))
        reply = self.server.reply(self.path, self.rfile.read(int(self.headers["content-length"])))
        if reply is None:
            self.send_error(404)
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.send_error(404)  # an upload reads nothing; huggingface_hub's optional lookups do without

    def log_message(self, *args) -> None:
        pass  # no access log on stderr


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    thread.join()
