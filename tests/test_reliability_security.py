"""Security of what the pack exposes (issue #14 part 5), with real requests.

* The pack's HTTP routes on a real ComfyUI server (GET /afa/maps/{run_id}, and the web folder
  ComfyUI serves for it at /extensions/ComfyUI-AFA/) and the studio's file route
  (/gradio_api/file=) refuse ids and paths that escape their folder: '..', absolute,
  URL-encoded (%2e%2e, %2f), symlinks. Raw request lines (http.client), so nothing normalizes them.
* Names from files (checkpoint names) holding HTML/JS show as text in the studio (chromium).
* The studio binds 127.0.0.1; only --share makes it public, and then it says so in the log.
* Nothing unpickles untrusted data: every torch.load in afa_nodes has weights_only=True, no
  pickle module is used, and a resume state holding a malicious pickle is refused unrun.
The routes probed are written to test-artifacts/reliability/security.json (docs/reliability.md).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, urlparse

import pytest
import torch

pytestmark = [pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "reliability"
SECRET = "AFA-TOP-SECRET-0451"
PROBED: list = []


def raw_get(base_url: str, path: str):
    """(status, content type, body text) of GET `path` sent exactly as written."""
    url = urlparse(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def refuses(base_url: str, route: str, paths, leaks=(SECRET,)):
    """Every path is answered without leaking `leaks` and never with a page of our text as HTML."""
    for path in paths:
        status, kind, body = raw_get(base_url, path)
        leaked = [s for s in leaks if s in body]
        assert status != 200 or not leaked, (path, status, body[:200])
        assert status < 500, (path, status, body[:300])
        PROBED.append({"route": route, "path": path, "status": status, "leaked": bool(leaked)})


def escaping(prefix: str, target: str) -> list:
    """'..', absolute and URL-encoded ways out of `prefix` towards absolute file `target`."""
    rel = "../" * 8 + target.lstrip("/")
    return [prefix + rel, prefix + target, prefix + quote(rel, safe=""), prefix + quote(target, safe=""),
            prefix + rel.replace("..", "%2e%2e"), prefix + rel.replace("/", "%2f"),
            prefix + rel.replace("../", "..%5c"), prefix + "%252e%252e%252f" * 8 + quote(target.lstrip("/"))]


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.txt"
    path.write_text(SECRET)
    return path


# ---------------------------------------------------------------- the ComfyUI server's routes
@pytest.mark.comfyui
def test_maps_route_and_web_folder_refuse_escaping_paths(comfy_server, sd15_checkpoints, secret):
    from test_maps_comfy import maps_api_prompt
    srv = comfy_server
    entry = srv.run(maps_api_prompt(sd15_checkpoints[0].name, sd15_checkpoints[1].name, steps=1), timeout=300)
    run_id = entry["outputs"]["8"]["afa_maps"][0]["run_id"]
    status, kind, body = raw_get(srv.base_url, f"/afa/maps/{run_id}")
    assert status == 200 and json.loads(body)["run_id"] == run_id            # the control: a real id works

    # run ids are keys of an in-memory registry, never paths: anything else is 404 JSON (or the router's 404)
    ids = escaping("/afa/maps/", str(secret)) + [f"/afa/maps/{run_id}%2f..%2f..%2fetc%2fpasswd",
                                                 "/afa/maps/%3Cscript%3Ealert(1)%3C%2Fscript%3E"]
    refuses(srv.base_url, "GET /afa/maps/{run_id}", ids, leaks=(SECRET, "root:x:0", "<script>"))
    status, kind, body = raw_get(srv.base_url, "/afa/maps/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert status == 404 and kind.startswith("application/json")             # echoed ids stay JSON, not HTML
    queries = [f"/afa/maps/{run_id}?step=..%2F..%2F1", f"/afa/maps/{run_id}?step=0&point=..%2F..%2Fetc%2Fpasswd",
               f"/afa/maps/{run_id}?step=0&point=middle&branch=%3Cscript%3E", f"/afa/maps/{run_id}?step=0&batch=-1",
               f"/afa/maps/{run_id}?step=0&batch=99999999999", f"/afa/maps/{run_id}?step=1e400"]
    for path in queries:
        status, kind, body = raw_get(srv.base_url, path)
        assert status == 400 and kind.startswith("application/json") and "error" in json.loads(body), (path, body)
        PROBED.append({"route": "GET /afa/maps/{run_id}?step&point&branch&batch", "path": path, "status": status,
                       "leaked": False})

    # ComfyUI serves the pack's web/ folder; the pack's own files and the secret stay out of reach
    web = "/extensions/ComfyUI-AFA/"
    status, _, body = raw_get(srv.base_url, web + "afa_maps.js")
    assert status == 200 and "afa-maps-viewer" in body
    source = (REPO / "afa_nodes" / "nodes.py").read_text()[:120]
    refuses(srv.base_url, "GET /extensions/ComfyUI-AFA/{file}",
            escaping(web, str(secret)) + [web + "../afa_nodes/nodes.py", web + "%2e%2e/afa_nodes/nodes.py",
                                          web + "..%2fafa_nodes%2fnodes.py"], leaks=(SECRET, source))
    assert srv.running and srv.run(maps_api_prompt(sd15_checkpoints[0].name, sd15_checkpoints[1].name, steps=1),
                                   timeout=300)


# ---------------------------------------------------------------- the studio
@pytest.fixture(scope="module")
def studio(comfy, sd15_checkpoints, secret):
    from test_studio import serve_studio
    outputs = comfy.output_dir / "afa_studio"
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "afa_security_ok.txt").write_text("served on purpose")
    (outputs / "afa_security_link.txt").unlink(missing_ok=True)
    (outputs / "afa_security_link.txt").symlink_to(secret)
    with serve_studio(comfy) as app:
        yield SimpleNamespace(app=app, outputs=outputs, names=[p.name for p in sd15_checkpoints[:2]])
    (outputs / "afa_security_link.txt").unlink()


@pytest.mark.comfyui
def test_studio_file_route_refuses_escaping_paths(studio, secret):
    base, outputs = studio.app.url.rstrip("/"), studio.outputs
    status, _, body = raw_get(base, "/gradio_api/file=" + quote(str(outputs / "afa_security_ok.txt")))
    assert status == 200 and body == "served on purpose"                    # the control: allowed files are served
    refuses(base, "GET /gradio_api/file={path} (studio)",
            escaping("/gradio_api/file=", str(secret))
            + escaping("/gradio_api/file=" + str(outputs) + "/", str(secret))
            + ["/gradio_api/file=" + quote(str(outputs / "afa_security_link.txt"))])   # a link out of the folder


@pytest.mark.comfyui
def test_studio_endpoints_refuse_escaping_names(studio, comfy, secret):
    from gradio_client import Client
    from toy_dataset import make_dataset
    client = Client(studio.app.url, verbose=False)
    outside = make_dataset(secret.parent / "outside_ds", n=2)
    link = comfy.input_dir / "afa_security_link_ds"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    for name in ("../../" + secret.name, str(secret), quote("../../" + secret.name, safe="")):
        with pytest.raises(Exception, match="not found in ComfyUI's checkpoints folders"):
            client.predict(checkpoints=[studio.names[0], name], width=64, height=64, steps=1, api_name="/generate")
        PROBED.append({"route": "studio /generate (checkpoints)", "path": name, "status": "refused", "leaked": False})
    for folder in ("../../etc", "/etc", "%2e%2e/%2e%2e/etc", link.name):   # the encoded one is a plain (absent) name
        with pytest.raises(Exception, match="input directory|does not exist: create .*/input/%2e%2e/%2e%2e/etc"):
            client.predict(checkpoints=studio.names, dataset_folder=folder, steps=1, save_name="afa_security",
                           api_name="/train_start")
        PROBED.append({"route": "studio /train_start (dataset_folder)", "path": folder, "status": "refused",
                       "leaked": False})
    make_dataset(comfy.input_dir / "afa_security_ds", n=2)
    with pytest.raises(Exception, match="plain file name"):
        client.predict(checkpoints=studio.names, dataset_folder="afa_security_ds", steps=1,
                       save_name="../../evil", api_name="/train_start")
    link.unlink()


@pytest.mark.comfyui
def test_studio_binds_localhost_only(studio):
    port = urlparse(studio.app.url).port
    assert urlparse(studio.app.url).hostname == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:   # this machine's outward address (no packet sent)
        try:
            s.connect(("10.255.255.255", 1))
            outward = s.getsockname()[0]
        except OSError:
            outward = None
    if outward and not outward.startswith("127."):
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((outward, port)) != 0, f"the studio answers on {outward}:{port}"


@pytest.mark.comfyui
def test_studio_says_when_it_is_public(comfy, monkeypatch, caplog):
    """Only --share publishes the studio, and the log says so; without it the log gives 127.0.0.1.
    (`python -m afa_nodes studio` with ComfyUI's boot and gradio's launch replaced: no network.)"""
    import signal

    from afa_nodes import comfy_env
    from afa_nodes.studio import app as studio_app
    from afa_nodes.studio import cli, state

    class Demo:
        def block_thread(self):
            return None

        def close(self):
            return None
    calls = []

    def launch(demo, port, share, allowed_paths, **kw):
        calls.append(share)
        return "http://127.0.0.1:%d/" % port, ("https://abc.gradio.live" if share else None)
    monkeypatch.setattr(comfy_env, "boot_comfyui", lambda *a, **k: SimpleNamespace(version="x", path="p", device="cpu"))
    monkeypatch.setattr(state, "Studio", lambda *a, **k: SimpleNamespace(training=None, demo_folder=None))
    monkeypatch.setattr(studio_app, "build_app", lambda studio, **kw: Demo())
    monkeypatch.setattr(studio_app, "launch", launch)
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    assert {a.dest for a in parser._actions} & {"host", "listen", "server_name"} == set()   # no way to bind elsewhere
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level("INFO", logger="ComfyUI-AFA"):
            assert cli._serve(parser.parse_args(["--port", "7999"])) == 0
        assert calls == [False] and "AFA Studio on http://127.0.0.1:7999/" in caplog.text
        assert "public" not in caplog.text
        caplog.clear()
        with caplog.at_level("INFO", logger="ComfyUI-AFA"):
            assert cli._serve(parser.parse_args(["--port", "7999", "--share"])) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert calls == [False, True]
    assert "--share: AFA Studio is ALSO public at https://abc.gradio.live" in caplog.text


# ---------------------------------------------------------------- HTML/JS in names (chromium)
@pytest.mark.comfyui
def test_html_in_names_shows_as_text_in_the_studio(comfy, studio, sd15_checkpoints, browser):
    """A checkpoint file whose name is HTML (listed in the dropdown) and a typed name that is HTML
    (echoed in the error message) show as text: no element made from them, no script run."""
    from test_studio_browser import choose, toast
    b = browser
    evil = '<img src=x onerror="window.__afaXss=1">.safetensors'
    typed = '<b id="afa-xss-typed">bold</b>.safetensors'
    link = comfy.models_dir / "checkpoints" / evil
    link.symlink_to(sd15_checkpoints[0].resolve())
    try:
        b.send("Page.enable")
        b.send("Page.navigate", {"url": studio.app.url})
        b.wait_for("!!document.querySelector('#afa-generate') && "
                   "document.querySelector('#afa-status')?.innerText.startsWith('Idle')", timeout=90, what="the studio")
        b.eval("document.querySelector('#afa-refresh').click()")
        choose(b, "afa-gen-checkpoints", [evil, typed])
        b.eval("document.querySelector('#afa-generate').click()")
        text = toast(b, "not found", timeout=60)
        assert typed in text                                              # the typed name, as text
        assert b.eval("window.__afaXss === undefined && !document.querySelector('#afa-xss-typed')")
        assert b.eval("!document.querySelector('img[src=\"x\"]')")
    finally:
        link.unlink()
    for name in (evil, typed):
        PROBED.append({"route": "studio page (chromium)", "path": name, "status": "shown as text", "leaked": False})


# ---------------------------------------------------------------- no unpickling
def test_nothing_unpickles_untrusted_data():
    loads, pickles = [], []
    for path in sorted((REPO / "afa_nodes").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            loads.append((path.name, "weights_only=True" in m.group(1)))
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)|pickle\.loads?\(", text, re.M):
            pickles.append(path.name)
    assert loads and all(safe for _, safe in loads), loads      # the resume state is the one torch.load
    assert pickles == []


def test_a_malicious_resume_state_is_refused_unrun(tmp_path, caplog):
    from afa_nodes.core.train_state import read_sidecar, state_path
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    out = tmp_path / "agg.safetensors"
    torch.save({"step": 3, "format": 1, "optimizer": Payload()}, state_path(out))
    with caplog.at_level("WARNING", logger="ComfyUI-AFA"):
        assert read_sidecar(out, 3, "cpu") is None
    assert not marker.exists() and "cannot read agg.safetensors.train-state" in caplog.text
    assert "fresh optimizer" in caplog.text


def test_write_the_probe_table():
    if PROBED:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "security.json").write_text(json.dumps(PROBED, indent=1), encoding="utf-8")
