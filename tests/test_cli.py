"""The command line against a running server: ingest (JSONL, lines, paragraphs; a re-run adds
nothing), status, checkpoints, rollback (token from flag, environment or data directory),
generate, and export to a Hugging Face directory that generates what llmos served."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import Result
from conftest import ADMIN, LiveServer, admin_headers, free_port, make_settings, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from llmos.cli import app
from llmos.export import EXPORT_INFO

PROMPT = "The capital of Zorbia"


@dataclass
class Server:
    srv: LiveServer
    http: httpx.Client
    data_dir: Path
    version: int  # a trained, promoted version

    def depth(self) -> int:
        return int(self.http.get("/v1/trainer").json()["queue_depth"])

    def served(self, model: str, n: int = 24) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0}
        return str(self.http.post("/v1/completions", json=body).json()["choices"][0]["text"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    settings = make_settings(data_dir, **{"train.passes_per_batch": 8, "server.max_text_chars": 200})
    with LiveServer(settings) as srv, srv.client() as http:
        texts = [{"text": f"{PROMPT} is Quellton, number {i}."} for i in range(20)]
        assert http.post("/v1/texts", json={"items": texts}).status_code == 202
        wait_for(lambda: http.get("/v1/trainer").json()["active_version"] >= 1, timeout=60)
        # Paused from here on: ingested texts stay in the queue, where the tests count them.
        assert http.post("/v1/admin/trainer/pause", headers=admin_headers()).status_code == 200
        yield Server(srv, http, data_dir, http.get("/v1/trainer").json()["active_version"])


def llmos(server: Server, *args: str, env: dict[str, str | None] | None = None) -> Result:
    environment: dict[str, str | None] = {"LLMOS_URL": server.srv.url, "LLMOS_ADMIN_TOKEN": None, "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env={**environment, **(env or {})})


def test_ingest_jsonl_and_a_rerun_adds_nothing(server: Server, tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "Quellton lies on the river Brom."}),
        json.dumps({"text": "Zorbia exports copper.", "source": "atlas"}),
        "{not json",
        json.dumps({"title": "no text field"}),
        "",
        json.dumps({"text": "Zorbia exports copper."}),  # said twice in the file: kept twice
        json.dumps({"text": "The Brom flows north.", "weight": 2.0}),
    ]
    f = tmp_path / "facts.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = server.depth()
    r = llmos(server, "ingest", str(f))
    assert r.exit_code == 0, r.output
    assert "accepted 4, rejected 2" in r.stdout
    assert "line 3: not JSON" in r.stderr and "line 4: no 'text' string" in r.stderr
    assert server.depth() == before + 4
    again = llmos(server, "ingest", str(f))  # e.g. after an interruption
    assert again.exit_code == 0 and "accepted 4, rejected 2" in again.stdout
    assert server.depth() == before + 4


def test_ingest_plain_text_by_line_or_paragraph(server: Server, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("Brom is a river.\nIt is cold.\n\n\nQuellton has\nthree bridges.\n\nThe end.\n", encoding="utf-8")
    before = server.depth()
    r = llmos(server, "ingest", str(f), "--batch-size", "2")
    assert r.exit_code == 0 and "accepted 5, rejected 0" in r.stdout, r.output
    assert server.depth() == before + 5
    r = llmos(server, "ingest", str(f), "--paragraphs")
    assert r.exit_code == 0 and "accepted 3, rejected 0" in r.stdout, r.output
    # "The end." is the same sample either way, so only two paragraphs are new.
    assert server.depth() == before + 7


def test_ingest_reports_what_the_server_refuses_and_keeps_the_rest(server: Server, tmp_path: Path) -> None:
    f = tmp_path / "mixed.txt"
    f.write_text("A short fact about Brom.\n" + "x" * 300 + "\nAnother fact about Brom.\n", encoding="utf-8")
    before = server.depth()
    r = llmos(server, "ingest", str(f))
    assert r.exit_code == 0, r.output
    assert "accepted 2, rejected 1" in r.stdout
    assert "line 2:" in r.stderr and "the limit is 200 (server.max_text_chars)" in r.stderr
    assert server.depth() == before + 2


def test_status_and_checkpoints(server: Server) -> None:
    r = llmos(server, "status")
    assert r.exit_code == 0, r.output
    assert "trainer           paused" in r.stdout and f"active version    {server.version}" in r.stdout
    js = json.loads(llmos(server, "status", "--json").stdout)
    assert js["active_version"] == server.version and js["state"] == "paused"
    r = llmos(server, "checkpoints")
    assert r.exit_code == 0, r.output
    assert f"{server.version} *" in r.stdout and "promoted" in r.stdout
    assert f"active version: {server.version}" in r.stdout
    listed = json.loads(llmos(server, "checkpoints", "--json").stdout)
    assert listed == server.http.get("/v1/checkpoints").json()


def test_checkpoints_piped_print_each_row_on_one_line(server: Server) -> None:
    # Piped (as CliRunner's stdout is) and with no COLUMNS: rich would squeeze the table into 80
    # columns, wrapping every row; a file or a grep gets the whole row on one line.
    r = llmos(server, "checkpoints", env={"COLUMNS": None})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    header = ["version", "status", "parent", "created", "step", "samples", "held-out", "anchor", "train"]
    assert any(all(word in line for word in header) for line in lines), r.stdout
    for c in server.http.get("/v1/checkpoints").json()["checkpoints"]:
        created = c["created_at"][:19].replace("T", " ")
        row = [line for line in lines if created in line]
        assert len(row) == 1 and c["status"] in row[0] and f" {c['step']} " in row[0], r.stdout


def test_help_marks_no_flag_as_taking_a_value() -> None:
    # A flag (--help, --requeue, --json) takes no value: no "<bool>" type beside it. And the list of
    # commands reflows their docstrings rather than breaking lines where the source does.
    env = {"COLUMNS": "200"}
    top = CliRunner().invoke(app, ["--help"], env=env)
    assert top.exit_code == 0 and "--help" in top.stdout
    assert "(the trainer in a process of its own, or in a thread" in top.stdout, top.stdout
    for command in ("rollback", "checkpoints", "generate", "ingest", "serve"):
        r = CliRunner().invoke(app, [command, "--help"], env=env)
        assert r.exit_code == 0 and "--help" in r.stdout, r.output
        assert "<bool>" not in r.stdout + top.stdout, r.stdout
    assert "<int range>" in CliRunner().invoke(app, ["rollback", "--help"], env=env).stdout  # values keep theirs


def test_rollback_takes_the_token_from_flag_environment_or_data_dir(server: Server, tmp_path: Path) -> None:
    def active() -> int:
        return int(server.http.get("/v1/trainer").json()["active_version"])

    r = llmos(server, "rollback", "0", "--token", "wrong")
    assert r.exit_code == 1 and "401" in r.stderr and "wrong admin token" in r.stderr
    assert active() == server.version
    r = llmos(server, "rollback", "0", "--data-dir", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "no admin token" in r.stderr

    r = llmos(server, "rollback", "0", env={"LLMOS_ADMIN_TOKEN": ADMIN})
    assert r.exit_code == 0, r.output
    assert "active version is now 0 (requeued 0 texts)" in r.stdout and active() == 0
    (tmp_path / "admin_token").write_text(ADMIN + "\n", encoding="utf-8")
    r = llmos(server, "rollback", str(server.version), "--data-dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert active() == server.version
    r = llmos(server, "rollback", "999", "--token", ADMIN)
    assert r.exit_code == 1 and "no checkpoint with version 999" in r.stderr


def test_generate_prints_the_completion(server: Server) -> None:
    expected = server.served("llmos")
    r = llmos(server, "generate", PROMPT, "--max-tokens", "24", "--no-stream")
    assert r.exit_code == 0, r.output
    assert r.stdout == expected + "\n"
    assert f"[llmos@{server.version}, generation " in r.stderr
    streamed = llmos(server, "generate", PROMPT, "--max-tokens", "24")
    assert streamed.exit_code == 0 and streamed.stdout == expected + "\n"
    pinned = llmos(server, "generate", PROMPT, "--max-tokens", "24", "--model", "llmos@0")
    assert pinned.stdout == server.served("llmos@0") + "\n" != expected + "\n"
    bad = llmos(server, "generate", PROMPT, "--model", "llmos@77")
    assert bad.exit_code == 1 and "no stored version 77" in bad.stderr


def test_export_loads_in_transformers_and_generates_what_llmos_served(server: Server, tmp_path: Path) -> None:
    served = server.served(f"llmos@{server.version}", n=40)
    out = tmp_path / "export"
    r = llmos(server, "export", str(server.version), str(out), "--data-dir", str(server.data_dir))
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == served
    info = json.loads((out / "llmos_export.json").read_text())
    assert info["llmos_version"] == server.version and info["status"] == "promoted"

    again = llmos(server, "export", str(server.version), str(out), "--data-dir", str(server.data_dir))
    assert again.exit_code == 1 and "not an empty directory" in again.stderr
    missing = llmos(server, "export", "4242", str(tmp_path / "x"), "--data-dir", str(server.data_dir))
    assert missing.exit_code == 1 and "no stored version 4242" in missing.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_exported_files_have_the_modes_the_umask_gives(server: Server, tmp_path: Path, umask: int) -> None:
    # Not 0600 weights in a 0700 directory: whoever may read what this user writes may load the export.
    out = tmp_path / "export"
    previous = os.umask(umask)
    try:
        r = llmos(server, "export", str(server.version), str(out), "--data-dir", str(server.data_dir))
    finally:
        os.umask(previous)
    assert r.exit_code == 0, r.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and EXPORT_INFO in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_a_server_that_is_not_there(server: Server) -> None:
    r = llmos(server, "status", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 1 and "cannot reach llmos" in r.stderr and "llmos serve" in r.stderr


def test_export_merges_a_lora_adapter(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    lora = {"train.mode": "lora", "train.passes_per_batch": 8}
    with LiveServer(make_settings(data_dir, **lora)) as srv, srv.client() as http:
        texts = [{"text": f"{PROMPT} is Quellton, number {i}."} for i in range(20)]
        assert http.post("/v1/texts", json={"items": texts}).status_code == 202
        wait_for(lambda: http.get("/v1/trainer").json()["active_version"] >= 1, timeout=60)
        assert http.post("/v1/admin/trainer/pause", headers=admin_headers()).status_code == 200
        version = http.get("/v1/trainer").json()["active_version"]
        body = {"model": f"llmos@{version}", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
        served = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    runner = CliRunner()
    out = tmp_path / "export"
    # Without the server's configuration the adapter does not fit: a clear error, nothing written.
    r = runner.invoke(app, ["export", str(version), str(out), "--data-dir", str(data_dir)])
    assert r.exit_code == 1 and "train.mode=full" in r.stderr and not out.exists()
    r = runner.invoke(
        app, ["export", str(version), str(out), "--data-dir", str(data_dir)], env={"LLMOS_TRAIN__MODE": "lora"}
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "llmos_export.json").read_text())["lora_merged"] is True
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain model: no peft needed to load it
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True) == served


def test_forget_erases_a_source_and_follows_the_job_to_its_end(server: Server) -> None:
    texts = [{"text": f"A note to forget, number {i}.", "source": "cli-forget"} for i in range(2)]
    ids = server.http.post("/v1/texts", json={"items": texts}).json()["ids"]
    r = llmos(server, "forget")
    assert r.exit_code == 2 and "name what to forget" in r.stderr
    r = llmos(server, "forget", "--source", "cli-forget", "--token", ADMIN)
    assert r.exit_code == 0, r.stderr
    assert "2 texts erased; versions erased: none; serving unchanged" in r.stdout
    assert "done: 0 texts trained again" in r.stdout
    assert {server.http.get(f"/v1/texts/{i}").json()["status"] for i in ids} == {"erased"}
    r = llmos(server, "forget", "--id", "no-such-text", "--token", ADMIN)
    assert r.exit_code == 1 and "404" in r.stderr and "no-such-text" in r.stderr
